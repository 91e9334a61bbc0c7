"""The OS root, walked safely: the one way the agent reads or writes a file on the OS disk.

The recovery environment mounts the broken machine's root filesystem (the OS root) and the
agent changes files on it: a remediation's quarantines, restores and modprobe entries, the
intent journal and quarantine manifests, and its own state files (``last-directive``, the
crash records archived after a good boot). Every one of those goes through ``OSRoot``,
because the OS root is untrusted: a damaged or tampered disk may hold symlinks pointing into
the recovery environment, bind mounts of other filesystems, FIFOs where files should be.

1. ``OSRoot(path)`` opens the OS root once. Every path below it is relative (``/``-separated,
   no ``..``, no absolute start; checked again here, not only by the wire models) and is
   walked **one directory at a time** from that fd with ``O_DIRECTORY|O_NOFOLLOW``: a
   component that is a symlink, or that is on another mount (device number or the kernel's
   mount id), is refused with ``PathRejected``; a missing one raises ``MissingFile``, or is
   created (mode 0700) for the agent's own state folders.
2. A file is opened through the directory fd it was found in (``O_NOFOLLOW|O_NONBLOCK``) and
   checked to be the regular file ``lstat`` saw; its sha256 is read through that handle
   (``digest.sha256_fd``), so the file that was hashed is the file that will be moved.
3. A file is written **atomically** (``write_atomic``): a temp file ``.<name>.tmp`` created
   with ``O_EXCL|O_NOFOLLOW``, written, fsynced, renamed over the name, the directory fsynced;
   after a power loss the name holds the old or the new content, never a mix. A rename never
   follows a symlink at the name: it replaces the link. ``OSRoot.write_file``, ``read_file``
   and ``rename`` do the walk and the write in one call, for the agent's state files.

Nothing here knows about directives: ``remediate`` and ``actions`` build the remediation on it,
``journal`` its records, ``state`` the agent's own files.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import RemediationError
from .protocol.wire import PathRuleError, check_relative_path

STATE_DIR_MODE = 0o700  # the agent's state: quarantined files may be sensitive; only root reads them
SYSTEM_DIR_MODE = 0o755  # an ordinary system directory (etc/modprobe.d), if one has to be made
DEFAULT_FILE_MODE = 0o644
_READ_CHUNK = 1 << 20

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: lstat already said "regular file", but if it was swapped for a FIFO in between,
# the open must not hang the agent.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class PathRejected(RemediationError):
    """Raised when a path is absolute, has a ``..`` part, passes through a symlink or a mount
    point, or does not name a regular file / directory where one is needed."""


class MissingFile(RemediationError):
    """Raised when a file or directory that is needed is not in the OS root."""


# --------------------------------------------------------------------------- small helpers


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    """``lstat`` of ``name`` in the open directory ``dir_fd``; None if there is nothing."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def file_kind(mode: int) -> str:
    """What a file is, for messages: "a regular file", "a symlink", "a FIFO"..."""
    for test, kind in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "of an unknown file type"


def split_relpath(relpath: object) -> list[str]:
    """The parts of a path relative to the OS root, or ``PathRejected``.

    Checked here, not only by the wire models: actions built with ``model_construct``, or paths
    read back from a journal on disk, never went through them."""
    if not isinstance(relpath, str):
        raise PathRejected(f"path {relpath!r} is not a string: name a file relative to the OS root")
    try:
        check_relative_path(relpath)
    except PathRuleError as exc:
        raise PathRejected(f"action path rejected: {exc}") from exc
    return relpath.split("/")


def read_fd(fd: int, limit: int | None = None) -> bytes:
    """The content of an open file from its start (at most ``limit`` bytes)."""
    os.lseek(fd, 0, os.SEEK_SET)
    parts: list[bytes] = []
    left = limit
    while left is None or left > 0:
        chunk = os.read(fd, _READ_CHUNK if left is None else min(_READ_CHUNK, left))
        if not chunk:
            break
        parts.append(chunk)
        if left is not None:
            left -= len(chunk)
    return b"".join(parts)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def mount_id(fd: int) -> int | None:
    """The kernel's mount id of an open file; None where /proc is missing.

    ``st_dev`` cannot tell a bind mount of the OS partition from the partition itself, and a
    rename between the two fails with EXDEV; the mount id can."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as info:
            for line in info:
                if line.startswith(b"mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def create_new(dir_fd: int, name: str) -> int:
    """A new file ``name`` in ``dir_fd`` (mode 0600, write only): fails if anything, even a
    dangling symlink, is already there."""
    return os.open(name, _CREATE_FLAGS, 0o600, dir_fd=dir_fd)


def remove_stale(dir_fd: int, name: str) -> None:
    """Remove one of the agent's own temp files, and only if it is a plain file: a crash may
    have left one behind, and it holds nothing anybody needs."""
    st = lstat_at(dir_fd, name)
    if st is not None and stat.S_ISREG(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)


def write_atomic(
    dir_fd: int, name: str, data: bytes, mode: int, *, shown: str | None = None, mtime_ns: int | None = None
) -> None:
    """Replace ``name`` in ``dir_fd`` so that after a power loss it holds either the old or the
    new content, never a mix: temp file, write, fsync, rename, fsync the directory.

    A symlink at ``name`` is replaced, not followed. Anything but a plain file at the temp name
    (a planted symlink) is refused with ``PathRejected``; ``shown`` names the file in that
    message. ``mtime_ns`` sets the new file's access and modification time."""
    tmp = f".{name}.tmp"
    st = lstat_at(dir_fd, tmp)
    if st is not None and not stat.S_ISREG(st.st_mode):
        where = f"{shown.rpartition('/')[0]}/{tmp}" if shown and "/" in shown else tmp
        raise PathRejected(
            f"{where} is {file_kind(st.st_mode)}: the agent writes {shown or name} through that temp "
            f"name and never follows what is there; remove it"
        )
    remove_stale(dir_fd, tmp)
    fd = create_new(dir_fd, tmp)
    try:
        try:
            write_all(fd, data)
            os.fchmod(fd, mode)
            if mtime_ns is not None:
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        remove_stale(dir_fd, tmp)
        raise
    os.fsync(dir_fd)


# --------------------------------------------------------------------------- the OS root


class OSRoot:
    """The OS partition, opened once; every path below it is reached from this fd, one
    directory at a time, refusing symlinks and other filesystems on the way."""

    def __init__(self, root: Path | str) -> None:
        self.path = Path(root)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise MissingFile(
                f"OS root {self.path} does not exist: mount the OS partition "
                f"there or point the agent at the right directory"
            ) from exc
        except NotADirectoryError as exc:
            raise PathRejected(
                f"OS root {self.path} is not a directory: point the agent at the "
                f"directory where the OS partition is mounted"
            ) from exc
        self.dev = os.fstat(self.fd).st_dev
        self.mount_id = mount_id(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> OSRoot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- walking

    def _check_mount(self, fd: int, shown: str) -> os.stat_result:
        st = os.fstat(fd)
        mnt = mount_id(fd) if self.mount_id is not None else None
        if st.st_dev != self.dev or (mnt is not None and mnt != self.mount_id):
            raise PathRejected(
                f"{shown} is on another mount than the OS root {self.path}: the agent only "
                f"changes files on the OS partition itself; name the file on that partition"
            )
        return st

    def _reject(self, dir_fd: int, part: str, shown: str, relpath: str) -> PathRejected:
        st = lstat_at(dir_fd, part)
        if st is not None and stat.S_ISLNK(st.st_mode):
            try:
                target = os.readlink(part, dir_fd=dir_fd)
            except OSError:
                target = "?"
            return PathRejected(
                f"{relpath}: component {shown} is a symlink (to {target}): the agent never "
                f"follows symlinks in the OS root; name the real path in the remediation"
            )
        kind = file_kind(st.st_mode) if st is not None else "not a directory"
        return PathRejected(
            f"{relpath}: component {shown} is {kind}, not a directory: "
            f"check the path against the device's diagnostics"
        )

    def _open_dir_in(
        self, dir_fd: int, part: str, shown: str, relpath: str, *, create: bool, mode: int
    ) -> int:
        created = False
        try:
            fd = os.open(part, _DIR_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError as exc:
            if not create:
                raise MissingFile(
                    f"{relpath}: directory {shown} does not exist: check the path "
                    f"against the device's diagnostics"
                ) from exc
            try:
                os.mkdir(part, mode, dir_fd=dir_fd)
                created = True
            except FileExistsError:
                pass  # appeared meanwhile: opened below with the same checks as any other
            os.fsync(dir_fd)  # the new entry must outlive a power loss before anything goes in
            fd = self._open_dir_in(dir_fd, part, shown, relpath, create=False, mode=mode)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise self._reject(dir_fd, part, shown, relpath) from exc
            raise
        try:
            self._check_mount(fd, shown)
            if created:
                os.fchmod(fd, mode)  # mkdir's mode went through the umask
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _walk(self, relpath: str, parts: Sequence[str], *, create: bool, mode: int) -> int:
        fd = os.dup(self.fd)
        try:
            for depth, part in enumerate(parts):
                shown = "/".join(parts[: depth + 1])
                next_fd = self._open_dir_in(fd, part, shown, relpath, create=create, mode=mode)
                os.close(fd)
                fd = next_fd
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextmanager
    def open_dir(self, relpath: str, *, create: bool = False, mode: int = STATE_DIR_MODE) -> Iterator[int]:
        """An fd on the directory ``relpath``; ``create`` makes missing parts with ``mode``."""
        fd = self._walk(relpath, split_relpath(relpath), create=create, mode=mode)
        try:
            yield fd
        finally:
            os.close(fd)

    @contextmanager
    def open_parent(
        self, relpath: str, *, create: bool = False, mode: int = STATE_DIR_MODE
    ) -> Iterator[tuple[int, str]]:
        """``(dir_fd, name)``: an fd on the directory holding ``relpath``, and its last part."""
        parts = split_relpath(relpath)
        fd = self._walk(relpath, parts[:-1], create=create, mode=mode)
        try:
            yield fd, parts[-1]
        finally:
            os.close(fd)

    @contextmanager
    def open_file(self, relpath: str) -> Iterator[int]:
        """A read-only fd on the regular file ``relpath`` (not a symlink, not another mount)."""
        with self.open_parent(relpath) as (dir_fd, name):
            with self.open_file_in(dir_fd, name, relpath) as fd:
                yield fd

    @contextmanager
    def open_file_in(self, dir_fd: int, name: str, relpath: str) -> Iterator[int]:
        """A read-only fd on the regular file ``name`` in the open directory ``dir_fd``;
        ``relpath`` names it in errors."""
        before = lstat_at(dir_fd, name)
        if before is None:
            raise MissingFile(
                f"{relpath}: no such file: check the path against the device's "
                f"diagnostics (was it already removed or renamed?)"
            )
        if stat.S_ISLNK(before.st_mode):
            try:
                target = os.readlink(name, dir_fd=dir_fd)
            except OSError:
                target = "?"
            raise PathRejected(
                f"{relpath} is a symlink (to {target}): the agent never follows symlinks; name the real file"
            )
        if not stat.S_ISREG(before.st_mode):
            raise PathRejected(
                f"{relpath} is {file_kind(before.st_mode)}: the action needs a regular "
                f"file; check the path against the device's diagnostics"
            )
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise PathRejected(
                    f"{relpath} became a symlink while being opened: run the agent "
                    f"again; if it persists, something is tampering with the disk"
                ) from exc
            raise
        try:
            st = self._check_mount(fd, relpath)
            if (st.st_ino, st.st_dev) != (before.st_ino, before.st_dev) or not stat.S_ISREG(st.st_mode):
                raise PathRejected(f"{relpath} changed while being opened: run the agent again")
            yield fd
        finally:
            os.close(fd)

    def missing_dirs(self, relpath: str) -> list[str]:
        """The directories of ``relpath`` that do not exist yet (what ``create`` would make),
        after checking the existing ones like any walk. Changes nothing: for preflight."""
        parts = split_relpath(relpath)
        fd = os.dup(self.fd)
        try:
            for depth, part in enumerate(parts):
                shown = "/".join(parts[: depth + 1])
                try:
                    next_fd = self._open_dir_in(fd, part, shown, relpath, create=False, mode=0)
                except MissingFile:
                    return ["/".join(parts[: d + 1]) for d in range(depth, len(parts))]
                os.close(fd)
                fd = next_fd
            return []
        finally:
            os.close(fd)

    # -- whole files (the agent's own state)

    def read_file(self, relpath: str, limit: int | None = None) -> bytes | None:
        """The content of the regular file ``relpath`` (at most ``limit`` bytes), or None if it
        or one of its directories does not exist. A symlink is refused, never followed."""
        try:
            with self.open_parent(relpath) as (dir_fd, name):
                if lstat_at(dir_fd, name) is None:
                    return None
                with self.open_file_in(dir_fd, name, relpath) as fd:
                    return read_fd(fd, limit)
        except MissingFile:
            return None

    def write_file(
        self, relpath: str, data: bytes, *, mode: int = 0o600, mtime_ns: int | None = None
    ) -> None:
        """Write ``relpath`` atomically, making missing directories (mode 0700: for the agent's
        own state only)."""
        with self.open_parent(relpath, create=True) as (dir_fd, name):
            write_atomic(dir_fd, name, data, mode, shown=relpath, mtime_ns=mtime_ns)

    def rename(self, src: str, dst: str) -> bool:
        """Rename the regular file ``src`` to ``dst`` (both existing directories of the OS root),
        replacing what is at ``dst`` unless it is a directory; False if ``src`` does not exist."""
        with self.open_parent(src) as (src_fd, src_name), self.open_parent(dst) as (dst_fd, dst_name):
            st = lstat_at(src_fd, src_name)
            if st is None:
                return False
            if not stat.S_ISREG(st.st_mode):
                raise PathRejected(
                    f"{src} is {file_kind(st.st_mode)}, not a regular file: the agent renames only "
                    f"its own files; remove it"
                )
            os.rename(src_name, dst_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
            os.fsync(dst_fd)
            os.fsync(src_fd)
        return True
