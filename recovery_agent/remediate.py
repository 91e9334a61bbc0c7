"""Applying a verified directive's actions to a machine's OS root, and taking them back.

This module owns every change the agent makes to the OS partition. The workflow:

1. ``apply_directive(os_root, directive)`` first runs a **preflight** that changes nothing: each
   path is walked one directory at a time from an fd on the OS root (``O_NOFOLLOW``; no ``..``,
   no absolute path, no symlink, no mount crossing), each file is hashed through the handle it
   was opened with, and the quarantine and journal folders are checked to be on the same mount.
   Any failure raises a ``RemediationError`` and the disk is exactly as it was.
2. It then writes an **intent journal** (``var/lib/recovery/journal/<directive_id>.json``:
   the actions, each step "planned", state "applying") with temp file, fsync, rename, fsync dir.
3. It runs the steps in order, updating the journal the same way after each one. Files are never
   deleted: a file taken off the machine is renamed into ``var/lib/recovery/quarantine/
   <directive_id>/`` (same filesystem, so the move is atomic) and recorded in ``manifest.json``
   there. Each step is idempotent, so running it twice is harmless. Final state: "applied".
4. At agent start, ``recover_journals(os_root)`` finds journals left "applying" by a power loss
   and rolls each one forward (the remaining steps still preflight) or else back; one left
   "rolling_back" (a roll back is journaled too) is rolled back to the end.
5. ``undo`` puts everything back; ``purge`` deletes a directive's quarantine, and only once the
   machine has booted well with it (the caller decides that); ``list_quarantine`` reports.

The journal and the manifest hold everything needed for steps 4 and 5 without the directive.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from recovery_agent.protocol.wire import (
    Action,
    ActionResult,
    Directive,
    DisableDriver,
    PathRuleError,
    QuarantineFile,
    RestoreFile,
    check_relative_path,
    utcnow,
)

from .errors import RemediationError

STATE_DIR = "var/lib/recovery"
QUARANTINE_DIR = f"{STATE_DIR}/quarantine"
JOURNAL_DIR = f"{STATE_DIR}/journal"
MODPROBE_DIR = "etc/modprobe.d"
MANIFEST_NAME = "manifest.json"

_STATE_DIR_MODE = 0o700  # quarantined files may be sensitive; only root reads them
_SYSTEM_DIR_MODE = 0o755  # etc/modprobe.d, if we have to create it, is an ordinary system dir
_DEFAULT_FILE_MODE = 0o644
_CHUNK = 1 << 20
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # wire.Identifier; also a safe file name
_MODULE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # wire.ModuleName

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: lstat already said "regular file", but if it was swapped for a FIFO in between,
# the open must not hang the agent.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


# --------------------------------------------------------------------------- errors


class PathRejected(RemediationError):
    """Raised when a path is absolute, has a ``..`` part, passes through a symlink or a mount
    point, or does not name a regular file / directory where one is needed."""


class HashMismatch(RemediationError):
    """Raised when a file's sha256, read through its open handle, is not the directive's."""

    def __init__(self, path: str, expected: str, actual: str, fix: str) -> None:
        self.path = path
        self.expected = expected
        self.actual = actual
        super().__init__(f"{path}: sha256 is {actual}, the directive expects {expected}: {fix}")


class MissingFile(RemediationError):
    """Raised when a file or directory an action needs is not in the OS root."""


class JournalError(RemediationError):
    """Raised when a directive's journal is missing, unreadable or in a state that forbids the
    operation asked for (e.g. undo after purge)."""


# --------------------------------------------------------------------------- on-disk records


class _DiskModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QuarantineEntry(_DiskModel):
    """One file in a directive's quarantine folder and where it came from."""

    action_index: int
    # quarantined: the file a quarantine_file action took away; replaced: what was at the
    # target of restore_file / disable_driver; undone: a file we installed, moved aside by undo.
    role: Literal["quarantined", "replaced", "undone"]
    original_path: str
    stored_name: str
    sha256: str
    size: int
    mode: int
    mtime: float
    uid: int
    gid: int
    quarantined_at: datetime
    restored_at: datetime | None = None


class QuarantineManifest(_DiskModel):
    version: Literal[1] = 1
    directive_id: str
    entries: list[QuarantineEntry] = []


class JournalStep(_DiskModel):
    index: int
    action: Action
    # What preflight found before anything changed: only "apply" steps are ever rolled back, so a
    # file that already had the wanted content is never taken away by an undo.
    plan: Literal["apply", "already_applied"]
    status: Literal["planned", "done", "rolled_back"] = "planned"
    result: Literal["applied", "already_applied"] | None = None
    detail: str = ""
    # Directories outside the agent's state that applying creates (etc/modprobe.d); undo removes
    # them again if they are empty.
    creates: list[str] = []


class IntentJournal(_DiskModel):
    version: Literal[1] = 1
    directive_id: str
    remediation_id: str
    state: Literal["applying", "applied", "rolling_back", "rolled_back", "purged"]
    steps: list[JournalStep]
    created_at: datetime
    updated_at: datetime
    notes: list[str] = []


_M = TypeVar("_M", bound=_DiskModel)


# --------------------------------------------------------------------------- the OS root


def sha256_fd(fd: int) -> str:
    """The sha256 of an open file, read from its start through the handle itself (never by
    name, so what is hashed is what will be moved)."""
    os.lseek(fd, 0, os.SEEK_SET)
    digest = hashlib.sha256()
    while chunk := os.read(fd, _CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _read_fd(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    parts = []
    while chunk := os.read(fd, _CHUNK):
        parts.append(chunk)
    return b"".join(parts)


def _mount_id(fd: int) -> int | None:
    # st_dev cannot tell a bind mount of the OS partition from the partition itself, and a rename
    # between the two fails with EXDEV; the kernel's mount id can. None where /proc is missing.
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as info:
            for line in info:
                if line.startswith(b"mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _kind(mode: int) -> str:
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


def _split(relpath: str) -> list[str]:
    # Checked again here, not only by the wire models: actions built with model_construct, or
    # paths read back from a journal on disk, never went through them.
    if not isinstance(relpath, str):
        raise PathRejected(f"path {relpath!r} is not a string: name a file relative to the OS root")
    try:
        check_relative_path(relpath)
    except PathRuleError as exc:
        raise PathRejected(f"action path rejected: {exc}") from exc
    return relpath.split("/")


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
        self.mount_id = _mount_id(self.fd)

    sha256_fd = staticmethod(sha256_fd)

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
        mount_id = _mount_id(fd) if self.mount_id is not None else None
        if st.st_dev != self.dev or (mount_id is not None and mount_id != self.mount_id):
            raise PathRejected(
                f"{shown} is on another mount than the OS root {self.path}: the agent only "
                f"changes files on the OS partition itself; name the file on that partition"
            )
        return st

    def _reject(self, dir_fd: int, part: str, shown: str, relpath: str) -> PathRejected:
        st = _lstat(dir_fd, part)
        if st is not None and stat.S_ISLNK(st.st_mode):
            try:
                target = os.readlink(part, dir_fd=dir_fd)
            except OSError:
                target = "?"
            return PathRejected(
                f"{relpath}: component {shown} is a symlink (to {target}): the agent never "
                f"follows symlinks in the OS root; name the real path in the remediation"
            )
        kind = _kind(st.st_mode) if st is not None else "not a directory"
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
    def open_dir(self, relpath: str, *, create: bool = False, mode: int = _STATE_DIR_MODE) -> Iterator[int]:
        """An fd on the directory ``relpath``; ``create`` makes missing parts (state dirs only)."""
        fd = self._walk(relpath, _split(relpath), create=create, mode=mode)
        try:
            yield fd
        finally:
            os.close(fd)

    @contextmanager
    def open_parent(
        self, relpath: str, *, create: bool = False, mode: int = _STATE_DIR_MODE
    ) -> Iterator[tuple[int, str]]:
        """``(dir_fd, name)``: an fd on the directory holding ``relpath``, and its last part."""
        parts = _split(relpath)
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
        """A read-only fd on the regular file ``name`` in the open directory ``dir_fd``."""
        before = _lstat(dir_fd, name)
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
                f"{relpath} is {_kind(before.st_mode)}: the action needs a regular "
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
        parts = _split(relpath)
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


# --------------------------------------------------------------------------- small file ops


def _write_atomic(dir_fd: int, name: str, data: bytes, mode: int) -> None:
    """Replace ``name`` in ``dir_fd`` so that after a power loss it holds either the old or the
    new content, never a mix: temp file, write, fsync, rename, fsync the directory."""
    tmp = f".{name}.tmp"
    _remove_stale(dir_fd, tmp)
    fd = os.open(tmp, _CREATE_FLAGS, 0o600, dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        _remove_stale(dir_fd, tmp)
        raise
    os.fsync(dir_fd)


def _remove_stale(dir_fd: int, name: str) -> None:
    # Only our own temp files are removed, and only if they are plain files: a crash may have
    # left one behind, and it holds nothing anybody needs.
    st = _lstat(dir_fd, name)
    if st is not None and stat.S_ISREG(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)


def _read_model(root: OSRoot, dir_fd: int, name: str, relpath: str, model: type[_M]) -> _M | None:
    if _lstat(dir_fd, name) is None:
        return None
    with root.open_file_in(dir_fd, name, relpath) as fd:
        raw = _read_fd(fd)
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise JournalError(
            f"{relpath} is not a valid {model.__name__} ({exc.error_count()} errors, first: "
            f"{exc.errors()[0]['msg']}): move it aside to inspect it; the agent cannot tell what "
            f"was applied without it"
        ) from exc


def _check_id(directive_id: str) -> str:
    if not isinstance(directive_id, str) or not _ID_RE.match(directive_id):
        raise JournalError(
            f"directive id {directive_id!r} is not a valid identifier (letters, "
            f"digits, _ and -, at most 64): copy it from list_quarantine or the "
            f"server's directive"
        )
    return directive_id


def _journal_relpath(directive_id: str) -> str:
    return f"{JOURNAL_DIR}/{directive_id}.json"


def _read_journal(root: OSRoot, directive_id: str) -> IntentJournal | None:
    try:
        with root.open_dir(JOURNAL_DIR) as jfd:
            return _read_model(
                root, jfd, f"{directive_id}.json", _journal_relpath(directive_id), IntentJournal
            )
    except MissingFile:
        return None


def _write_journal(root: OSRoot, journal: IntentJournal) -> None:
    journal.updated_at = utcnow()
    with root.open_dir(JOURNAL_DIR, create=True) as jfd:
        _write_atomic(
            jfd, f"{journal.directive_id}.json", journal.model_dump_json(indent=2).encode() + b"\n", 0o600
        )


def modprobe_conf_path(module: str) -> str:
    return f"{MODPROBE_DIR}/recovery-disable-{module}.conf"


def modprobe_conf_content(module: str) -> bytes:
    # "install ... /bin/false" also stops explicit modprobe calls and dependency loads, which a
    # blacklist line alone does not.
    return f"blacklist {module}\ninstall {module} /bin/false\n".encode()


def _target(action: Action) -> str:
    if isinstance(action, (QuarantineFile, RestoreFile)):
        return action.path
    if isinstance(action, DisableDriver):
        if not isinstance(action.name, str) or not _MODULE_RE.match(action.name):
            raise PathRejected(
                f"module name {action.name!r} is not a kernel module name "
                f"(letters, digits, _ and -): fix the remediation"
            )
        return modprobe_conf_path(action.name)
    raise RemediationError(
        f"action type {getattr(action, 'type', action)!r} is unknown to this "
        f"agent: update the agent or remove the action from the remediation"
    )


def _slot(index: int, name: str) -> str:
    return f"{index}-{name}"


def _undone_slot(index: int, name: str) -> str:
    return f"{index}.undone-{name}"


def _tmp_name(directive_id: str, index: int) -> str:
    return f".recovery-{directive_id}-{index}.tmp"


# --------------------------------------------------------------------------- the steps


@dataclass
class _Outcome:
    status: Literal["apply", "applied", "already_applied"]  # "apply": preflight says go
    detail: str
    creates: list[str] = field(default_factory=list)


class _Remediation:
    """One directive's steps on one OS root: preflight (``dry_run``), apply and roll back.
    Each step function does the checks and the change in one place, so that what preflight
    approved and what is executed can never drift apart."""

    def __init__(self, root: OSRoot, directive_id: str) -> None:
        self.root = root
        self.directive_id = _check_id(directive_id)
        self.qdir = f"{QUARANTINE_DIR}/{directive_id}"
        self._qfd: int | None = None

    def __enter__(self) -> _Remediation:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._qfd is not None:
            os.close(self._qfd)
            self._qfd = None

    # -- the quarantine folder

    def qfd(self, *, create: bool) -> int | None:
        if self._qfd is None:
            try:
                self._qfd = self.root._walk(self.qdir, _split(self.qdir), create=create, mode=_STATE_DIR_MODE)
            except MissingFile:
                return None
        return self._qfd

    def _manifest(self, qfd: int) -> QuarantineManifest:
        manifest = _read_model(
            self.root, qfd, MANIFEST_NAME, f"{self.qdir}/{MANIFEST_NAME}", QuarantineManifest
        )
        return manifest or QuarantineManifest(directive_id=self.directive_id)

    def _record(self, qfd: int, entry: QuarantineEntry) -> None:
        manifest = self._manifest(qfd)
        manifest.entries = [e for e in manifest.entries if e.stored_name != entry.stored_name]
        manifest.entries.append(entry)
        _write_atomic(qfd, MANIFEST_NAME, manifest.model_dump_json(indent=2).encode() + b"\n", 0o600)

    def _entry(self, qfd: int, slot: str) -> QuarantineEntry | None:
        return next((e for e in self._manifest(qfd).entries if e.stored_name == slot), None)

    def _held_hash(self, slot: str) -> str | None:
        qfd = self.qfd(create=False)
        if qfd is None or _lstat(qfd, slot) is None:
            return None
        with self.root.open_file_in(qfd, slot, f"{self.qdir}/{slot}") as fd:
            return sha256_fd(fd)

    def _new_entry(
        self,
        st: os.stat_result,
        digest: str,
        relpath: str,
        slot: str,
        index: int,
        role: Literal["quarantined", "replaced", "undone"],
    ) -> QuarantineEntry:
        return QuarantineEntry(
            action_index=index,
            role=role,
            original_path=relpath,
            stored_name=slot,
            sha256=digest,
            size=st.st_size,
            mode=stat.S_IMODE(st.st_mode),
            mtime=st.st_mtime,
            uid=st.st_uid,
            gid=st.st_gid,
            quarantined_at=utcnow(),
        )

    def _ensure_recorded(
        self, slot: str, relpath: str, index: int, digest: str, role: Literal["quarantined", "replaced"]
    ) -> None:
        # A power loss between the rename and the manifest write leaves the file in quarantine
        # but unlisted; rename keeps its metadata, so the entry can be rebuilt from it.
        qfd = self.qfd(create=True)
        assert qfd is not None
        if self._entry(qfd, slot) is None:
            st = os.stat(slot, dir_fd=qfd, follow_symlinks=False)
            self._record(qfd, self._new_entry(st, digest, relpath, slot, index, role))

    def _move_to_quarantine(
        self,
        dir_fd: int,
        name: str,
        fd: int,
        digest: str,
        relpath: str,
        slot: str,
        index: int,
        role: Literal["quarantined", "replaced", "undone"],
    ) -> None:
        qfd = self.qfd(create=True)
        assert qfd is not None
        if _lstat(qfd, slot) is not None:
            raise RemediationError(
                f"{self.qdir}/{slot} already exists: the quarantine of directive "
                f"{self.directive_id} was changed by hand; inspect it, then undo the directive"
            )
        st = os.fstat(fd)
        try:
            os.rename(name, slot, src_dir_fd=dir_fd, dst_dir_fd=qfd)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise RemediationError(
                    f"cannot move {relpath} to {self.qdir}: they are on different mounts; the "
                    f"quarantine must be on the OS partition itself (no bind mount on "
                    f"{STATE_DIR})"
                ) from exc
            raise
        moved = os.stat(slot, dir_fd=qfd, follow_symlinks=False)
        if (moved.st_dev, moved.st_ino) != (st.st_dev, st.st_ino):
            # The name was swapped for another file between hashing and renaming: give back what
            # we took rather than keep a file nobody checked.
            os.rename(slot, name, src_dir_fd=qfd, dst_dir_fd=dir_fd)
            raise RemediationError(
                f"{relpath} was replaced while being quarantined: run the "
                f"agent again; if it persists, something is writing there"
            )
        os.fsync(qfd)
        os.fsync(dir_fd)
        self._record(qfd, self._new_entry(st, digest, relpath, slot, index, role))

    def _move_back(self, slot: str, dir_fd: int, name: str) -> None:
        qfd = self.qfd(create=False)
        assert qfd is not None
        os.rename(slot, name, src_dir_fd=qfd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
        os.fsync(qfd)
        entry = self._entry(qfd, slot)
        if entry is not None:
            self._record(qfd, entry.model_copy(update={"restored_at": utcnow()}))

    # -- apply (dry_run: preflight)

    def step(self, index: int, action: Action, *, dry_run: bool) -> _Outcome:
        if isinstance(action, QuarantineFile):
            return self._quarantine(index, action, dry_run=dry_run)
        if isinstance(action, RestoreFile):
            return self._restore(index, action, dry_run=dry_run)
        if isinstance(action, DisableDriver):
            return self._disable(index, action, dry_run=dry_run)
        _target(action)  # raises the "unknown action" error
        raise AssertionError("unreachable")

    def _quarantine(self, index: int, action: QuarantineFile, *, dry_run: bool) -> _Outcome:
        with self.root.open_parent(action.path) as (dir_fd, name):
            slot = _slot(index, name)
            held = self._held_hash(slot)
            if held == action.sha256:
                if not dry_run:
                    self._ensure_recorded(slot, action.path, index, held, "quarantined")
                return _Outcome(
                    "already_applied", f"{action.path} is already quarantined as {self.qdir}/{slot}"
                )
            if held is not None:
                raise RemediationError(
                    f"{self.qdir}/{slot} holds a file with sha256 {held}, not {action.sha256}: "
                    f"the quarantine was changed by hand; inspect it, then undo the directive"
                )
            with self.root.open_file_in(dir_fd, name, action.path) as fd:
                actual = sha256_fd(fd)
                if actual != action.sha256:
                    raise HashMismatch(
                        action.path,
                        action.sha256,
                        actual,
                        "this device's file is not the one the remediation targets; leave it and "
                        "ask for a remediation matching the content in the diagnostics",
                    )
                links = os.fstat(fd).st_nlink
                if links > 1:
                    # Moving one name would leave the same bad content loadable by the others.
                    raise PathRejected(
                        f"{action.path} has {links} hard links: quarantining this name would leave "
                        f"the content reachable through the others; find them (find / -samefile) "
                        f"and quarantine every name in one remediation"
                    )
                if dry_run:
                    return _Outcome("apply", f"will quarantine {action.path}")
                self._move_to_quarantine(dir_fd, name, fd, actual, action.path, slot, index, "quarantined")
        return _Outcome("applied", f"moved {action.path} to {self.qdir}/{slot}")

    def _restore(self, index: int, action: RestoreFile, *, dry_run: bool) -> _Outcome:
        with self.root.open_parent(action.path) as (dir_fd, name):
            slot = _slot(index, name)
            tmp = _tmp_name(self.directive_id, index)
            current = _lstat(dir_fd, name)
            held = self._held_hash(slot)
            if current is not None:
                with self.root.open_file_in(dir_fd, name, action.path) as fd:
                    if sha256_fd(fd) == action.sha256:
                        if not dry_run:
                            _remove_stale(dir_fd, tmp)
                            if held is not None:
                                self._ensure_recorded(slot, action.path, index, held, "replaced")
                        return _Outcome(
                            "already_applied",
                            f"{action.path} already has the driver store's content ({action.sha256[:12]}…)",
                        )
                if held is not None:
                    raise RemediationError(
                        f"{action.path} exists but its previous version is already in "
                        f"{self.qdir}/{slot}: something wrote {action.path} since; inspect both, "
                        f"then undo the directive"
                    )
            with self.root.open_file(action.source) as src:
                actual = sha256_fd(src)
                if actual != action.sha256:
                    raise HashMismatch(
                        action.source,
                        action.sha256,
                        actual,
                        "the driver store's copy is damaged or not the version the remediation "
                        "names; repair the driver store or fix the remediation",
                    )
                if dry_run:
                    return _Outcome("apply", f"will replace {action.path} with {action.source}")
                if held is not None:
                    self._ensure_recorded(slot, action.path, index, held, "replaced")
                self._install_copy(dir_fd, name, tmp, src, action, index, slot, current)
        return _Outcome(
            "applied",
            f"replaced {action.path} with {action.source}"
            + (f"; the previous file is {self.qdir}/{slot}" if current else ""),
        )

    def _install_copy(
        self,
        dir_fd: int,
        name: str,
        tmp: str,
        src: int,
        action: RestoreFile,
        index: int,
        slot: str,
        current: os.stat_result | None,
    ) -> None:
        # The new file takes the old one's mode and owner, so e.g. a root-only module stays so.
        original: os.stat_result | QuarantineEntry | None = current
        qfd = self.qfd(create=False)
        if original is None and qfd is not None:
            original = self._entry(qfd, slot)  # an earlier attempt already moved it away
        if isinstance(original, QuarantineEntry):
            mode, uid, gid = original.mode, original.uid, original.gid
        elif original is not None:
            mode, uid, gid = stat.S_IMODE(original.st_mode), original.st_uid, original.st_gid
        else:
            mode, uid, gid = _DEFAULT_FILE_MODE, -1, -1
        _remove_stale(dir_fd, tmp)
        out = os.open(tmp, _CREATE_FLAGS, 0o600, dir_fd=dir_fd)
        try:
            try:
                # Hash what is actually written, from the same handle, not the preflight read.
                os.lseek(src, 0, os.SEEK_SET)
                digest = hashlib.sha256()
                while chunk := os.read(src, _CHUNK):
                    digest.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(out, view) :]
                if digest.hexdigest() != action.sha256:
                    raise HashMismatch(
                        action.source,
                        action.sha256,
                        digest.hexdigest(),
                        "the driver store's copy changed while being copied; "
                        "check the disk, then run the agent again",
                    )
                os.fchmod(out, mode)
                st = os.fstat(out)
                if (uid, gid) != (-1, -1) and (st.st_uid, st.st_gid) != (uid, gid):
                    try:
                        os.fchown(out, uid, gid)
                    except PermissionError:
                        pass  # only outside the recovery environment (tests, not root)
                os.fsync(out)
            finally:
                os.close(out)
            if current is not None:
                with self.root.open_file_in(dir_fd, name, action.path) as fd:
                    self._move_to_quarantine(
                        dir_fd, name, fd, sha256_fd(fd), action.path, slot, index, "replaced"
                    )
            if _lstat(dir_fd, name) is not None:
                raise RemediationError(
                    f"{action.path} reappeared while being replaced: run the "
                    f"agent again; if it persists, something is writing there"
                )
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            _remove_stale(dir_fd, tmp)
            raise
        os.fsync(dir_fd)

    def _disable(self, index: int, action: DisableDriver, *, dry_run: bool) -> _Outcome:
        relpath = _target(action)
        content = modprobe_conf_content(action.name)
        creates = self.root.missing_dirs(MODPROBE_DIR)
        if dry_run and creates:
            return _Outcome("apply", f"will write {relpath}", creates=creates)
        with self.root.open_dir(MODPROBE_DIR, create=not dry_run, mode=_SYSTEM_DIR_MODE) as dir_fd:
            name = relpath.rsplit("/", 1)[1]
            slot = _slot(index, name)
            if _lstat(dir_fd, name) is not None:
                with self.root.open_file_in(dir_fd, name, relpath) as fd:
                    if _read_fd(fd) == content:
                        if not dry_run:
                            held = self._held_hash(slot)
                            if held is not None:
                                self._ensure_recorded(slot, relpath, index, held, "replaced")
                        return _Outcome("already_applied", f"{relpath} already disables {action.name}")
                    if dry_run:
                        return _Outcome("apply", f"will replace {relpath}")
                    self._move_to_quarantine(
                        dir_fd, name, fd, sha256_fd(fd), relpath, slot, index, "replaced"
                    )
            if dry_run:
                return _Outcome("apply", f"will write {relpath}")
            _write_atomic(dir_fd, name, content, _DEFAULT_FILE_MODE)
        return _Outcome("applied", f"wrote {relpath}: {action.name} will not load at boot")

    # -- preflight, run, roll back

    def preflight(self, steps: Sequence[tuple[int, Action]]) -> list[_Outcome]:
        """Check every step against the disk as it is now; raise on the first that cannot be
        applied. Changes nothing."""
        targets: dict[str, int] = {}
        for index, action in steps:
            target = _target(action)
            _split(target)
            if target == STATE_DIR or target.startswith(STATE_DIR + "/"):
                raise PathRejected(
                    f"action {index}: {target} is inside the agent's own state "
                    f"({STATE_DIR}): a remediation may not touch it"
                )
            if target in targets:
                raise RemediationError(
                    f"actions {targets[target]} and {index} both change "
                    f"{target}: fix the remediation so each file is named once"
                )
            targets[target] = index
        for index, action in steps:
            if isinstance(action, RestoreFile) and action.source in targets:
                raise RemediationError(
                    f"action {index} restores from {action.source}, which action "
                    f"{targets[action.source]} changes: fix the remediation"
                )
        # Walked now so that a symlinked or foreign-mounted state folder fails before any change.
        self.root.missing_dirs(self.qdir)
        self.root.missing_dirs(JOURNAL_DIR)
        return [self.step(index, action, dry_run=True) for index, action in steps]

    def run(self, journal: IntentJournal, on_step: Callable[[int], None] | None) -> list[ActionResult]:
        """Run the journal's planned steps in order, recording each; on a step's failure roll
        back what was done and raise."""
        for step in journal.steps:
            if step.status != "planned":
                continue
            try:
                outcome = self.step(step.index, step.action, dry_run=False)
            except (RemediationError, OSError) as exc:
                lines = self.roll_back(journal)
                undone = "; ".join(lines) if lines else "nothing had been changed"
                raise RemediationError(
                    f"directive {journal.directive_id}: step {step.index} ({step.action.type}) "
                    f"failed: {exc} -- rolled back: {undone}"
                ) from exc
            step.status = "done"
            step.result = "already_applied" if outcome.status == "already_applied" else "applied"
            step.detail = outcome.detail
            if all(s.status == "done" for s in journal.steps):
                journal.state = "applied"
            _write_journal(self.root, journal)
            # After the journal is durable: a crash inside on_step is a crash after this step.
            if on_step is not None:
                on_step(step.index)
        if journal.state != "applied":
            journal.state = "applied"
            _write_journal(self.root, journal)
        return [
            ActionResult(
                index=s.index, type=s.action.type, status=s.result or "applied", detail=s.detail[:2048]
            )
            for s in journal.steps
        ]

    def roll_back(self, journal: IntentJournal) -> list[str]:
        """Undo the journal's steps, last first. The journal says "rolling_back" first, so a power
        loss midway is finished at the next start rather than rolled forward over half-undone
        steps; it becomes "rolled_back" only if every step could be undone, otherwise it stays
        "rolling_back" (retried at each start) and the lines say what blocks it."""
        if journal.state != "rolling_back":
            journal.state = "rolling_back"
            _write_journal(self.root, journal)
        lines: list[str] = []
        complete = True
        for step in reversed(journal.steps):
            if step.status == "rolled_back" or step.plan == "already_applied":
                continue
            try:
                line, done = self._undo_step(step)
            except (RemediationError, OSError) as exc:
                line, done = f"step {step.index}: could not be undone: {exc}", False
            lines.append(line)
            if done:
                step.status = "rolled_back"
            else:
                complete = False
        if complete:
            journal.state = "rolled_back"
        journal.notes.append(f"{utcnow().isoformat()} roll back: " + "; ".join(lines))
        _write_journal(self.root, journal)
        return lines

    def _undo_step(self, step: JournalStep) -> tuple[str, bool]:
        action = step.action
        if isinstance(action, QuarantineFile):
            return self._undo_quarantine(step.index, action)
        if isinstance(action, RestoreFile):
            return self._undo_restore(step.index, action)
        if isinstance(action, DisableDriver):
            return self._undo_disable(step.index, action, step.creates)
        raise RemediationError(f"step {step.index}: unknown action {action!r}")

    def _blocked(self, index: int, slot: str, relpath: str) -> tuple[str, bool]:
        return (
            f"step {index}: left {self.qdir}/{slot} in quarantine because {relpath} exists "
            f"again: move that file aside and run undo again",
            False,
        )

    def _undo_quarantine(self, index: int, action: QuarantineFile) -> tuple[str, bool]:
        qfd = self.qfd(create=False)
        with self.root.open_parent(action.path) as (dir_fd, name):
            slot = _slot(index, name)
            if qfd is None or _lstat(qfd, slot) is None:
                return f"step {index}: {action.path} was never moved; nothing to undo", True
            if _lstat(dir_fd, name) is not None:
                return self._blocked(index, slot, action.path)
            self._move_back(slot, dir_fd, name)
        return f"step {index}: moved {action.path} back from quarantine", True

    def _undo_restore(self, index: int, action: RestoreFile) -> tuple[str, bool]:
        with self.root.open_parent(action.path) as (dir_fd, name):
            slot = _slot(index, name)
            _remove_stale(dir_fd, _tmp_name(self.directive_id, index))
            qfd = self.qfd(create=False)
            held = qfd is not None and _lstat(qfd, slot) is not None
            moved_ours = False
            if _lstat(dir_fd, name) is not None:
                with self.root.open_file_in(dir_fd, name, action.path) as fd:
                    digest = sha256_fd(fd)
                    if digest != action.sha256:
                        if held:
                            return self._blocked(index, slot, action.path)
                        return (f"step {index}: {action.path} was never replaced; nothing to undo", True)
                    # Our copy of the store file goes to quarantine too: nothing is ever deleted.
                    self._move_to_quarantine(
                        dir_fd, name, fd, digest, action.path, _undone_slot(index, name), index, "undone"
                    )
                    moved_ours = True
            if held:
                self._move_back(slot, dir_fd, name)
                return f"step {index}: put the previous {action.path} back", True
        if moved_ours:
            return (f"step {index}: moved the restored {action.path} aside (there was no file before)", True)
        return f"step {index}: {action.path} was never replaced; nothing to undo", True

    def _undo_disable(self, index: int, action: DisableDriver, creates: list[str]) -> tuple[str, bool]:
        relpath = _target(action)
        try:
            with self.root.open_dir(MODPROBE_DIR) as dir_fd:
                name = relpath.rsplit("/", 1)[1]
                slot = _slot(index, name)
                qfd = self.qfd(create=False)
                held = qfd is not None and _lstat(qfd, slot) is not None
                if _lstat(dir_fd, name) is not None:
                    with self.root.open_file_in(dir_fd, name, relpath) as fd:
                        ours = _read_fd(fd) == modprobe_conf_content(action.name)
                    if not ours:
                        if held:
                            return self._blocked(index, slot, relpath)
                        return f"step {index}: {relpath} is not ours; nothing to undo", True
                    # A file we generated from the module name alone: removing it loses nothing.
                    os.unlink(name, dir_fd=dir_fd)
                    os.fsync(dir_fd)
                if held:
                    self._move_back(slot, dir_fd, name)
        except MissingFile:
            return f"step {index}: {MODPROBE_DIR} does not exist; nothing to undo", True
        for directory in reversed(creates):
            with self.root.open_parent(directory) as (parent_fd, dir_name):
                try:
                    os.rmdir(dir_name, dir_fd=parent_fd)
                    os.fsync(parent_fd)
                except OSError:
                    break  # not empty (someone else uses it): it stays
        return f"step {index}: removed {relpath}; {action.name} loads at boot again", True


# --------------------------------------------------------------------------- public API


def apply_directive(
    os_root: Path | str, directive: Directive, *, on_step: Callable[[int], None] | None = None
) -> list[ActionResult]:
    """Apply a verified directive to the OS root: preflight, journal, steps (see the module
    docstring). ``on_step(i)`` runs after step ``i`` and its journal update are durable.

    Raises a ``RemediationError`` if preflight fails (nothing changed) or a step fails (what was
    done is rolled back first)."""
    directive_id = _check_id(directive.directive_id)
    actions = list(directive.actions)
    with OSRoot(os_root) as root, _Remediation(root, directive_id) as remediation:
        journal = _read_journal(root, directive_id)
        if journal is not None:
            if journal.state in ("applied", "purged"):
                return [
                    ActionResult(
                        index=s.index,
                        type=s.action.type,
                        status="already_applied",
                        detail=f"directive {directive_id} was applied before "
                        f"({journal.state} {journal.updated_at.isoformat()})",
                    )
                    for s in journal.steps
                ]
            if journal.state in ("applying", "rolling_back"):
                raise JournalError(
                    f"directive {directive_id} has an unfinished {journal.state[:-3]} in "
                    f"{_journal_relpath(directive_id)}: run recover_journals first (the agent "
                    f"does at start)"
                )
            raise JournalError(
                f"directive {directive_id} was rolled back on this machine: ask the server for a "
                f"new directive if it should be applied again"
            )
        outcomes = remediation.preflight(list(enumerate(actions)))
        now = utcnow()
        journal = IntentJournal(
            directive_id=directive_id,
            remediation_id=directive.remediation_id,
            state="applying",
            created_at=now,
            updated_at=now,
            steps=[
                JournalStep(
                    index=i,
                    action=a,
                    creates=o.creates,
                    plan="already_applied" if o.status == "already_applied" else "apply",
                )
                for i, (a, o) in enumerate(zip(actions, outcomes, strict=True))
            ],
        )
        # The first change to the disk: from here on, a power loss is recovered from the journal.
        _write_journal(root, journal)
        return remediation.run(journal, on_step)


def recover_journals(os_root: Path | str) -> list[str]:
    """At agent start: finish or revert every apply a power loss interrupted. A journal is
    rolled forward when all its remaining steps still preflight, else rolled back. Returns one
    line per journal handled."""
    lines: list[str] = []
    with OSRoot(os_root) as root:
        try:
            with root.open_dir(JOURNAL_DIR) as jfd:
                names = sorted(os.listdir(jfd))
        except MissingFile:
            return []
        for file_name in names:
            directive_id = file_name.removesuffix(".json")
            if not file_name.endswith(".json") or not _ID_RE.match(directive_id):
                continue  # our own temp files, or nothing of ours
            try:
                journal = _read_journal(root, directive_id)
            except RemediationError as exc:
                lines.append(f"directive {directive_id}: journal not usable: {exc}")
                continue
            if journal is None or journal.state not in ("applying", "rolling_back"):
                continue
            lines.append(_recover_one(root, journal))
    return lines


def _recover_one(root: OSRoot, journal: IntentJournal) -> str:
    directive_id = journal.directive_id
    with _Remediation(root, directive_id) as remediation:
        if journal.state == "rolling_back":
            undone = remediation.roll_back(journal)
            verdict = (
                "finished" if journal.state == "rolled_back" else "still incomplete, retried at next start"
            )
            return f"directive {directive_id}: interrupted roll back {verdict}: " + "; ".join(undone)
        remaining = [s for s in journal.steps if s.status == "planned"]
        try:
            remediation.preflight([(s.index, s.action) for s in remaining])
        except RemediationError as exc:
            undone = remediation.roll_back(journal)
            verdict = (
                "rolled back"
                if journal.state == "rolled_back"
                else "roll back incomplete, retried at next start"
            )
            return (
                f"directive {directive_id}: interrupted apply {verdict}, because a remaining "
                f"step no longer applies ({exc}): " + "; ".join(undone)
            )
        try:
            remediation.run(journal, None)
        except RemediationError as exc:
            return f"directive {directive_id}: roll forward failed: {exc}"
        done = ", ".join(str(s.index) for s in remaining) or "none left"
        return f"directive {directive_id}: interrupted apply rolled forward (steps run: {done})"


def undo(os_root: Path | str, directive_id: str) -> list[str]:
    """Put back everything a directive changed; the journal becomes "rolled_back". Raises a
    ``RemediationError`` listing what blocks it if something cannot be put back."""
    directive_id = _check_id(directive_id)
    with OSRoot(os_root) as root, _Remediation(root, directive_id) as remediation:
        journal = _read_journal(root, directive_id)
        if journal is None:
            raise JournalError(
                f"no journal {_journal_relpath(directive_id)}: directive "
                f"{directive_id} was never applied to this OS root; check the id "
                f"with list_quarantine"
            )
        if journal.state == "rolled_back":
            return [f"directive {directive_id} is already rolled back; nothing changed"]
        if journal.state == "purged":
            raise JournalError(
                f"directive {directive_id} was purged after a good boot: its "
                f"quarantine is gone, so it cannot be undone; ask for a "
                f"remediation that reverses it"
            )
        lines = remediation.roll_back(journal)
        if journal.state != "rolled_back":
            raise RemediationError(f"directive {directive_id}: undo incomplete: " + "; ".join(lines))
        return lines


def purge(os_root: Path | str, directive_id: str) -> None:
    """After a confirmed good boot: delete the directive's quarantine folder; the journal
    becomes "purged" (kept, so the directive is never applied twice)."""
    directive_id = _check_id(directive_id)
    with OSRoot(os_root) as root:
        journal = _read_journal(root, directive_id)
        if journal is None:
            raise JournalError(
                f"no journal {_journal_relpath(directive_id)}: nothing to purge "
                f"for directive {directive_id}; check the id with list_quarantine"
            )
        if journal.state == "purged":
            return
        if journal.state in ("applying", "rolling_back"):
            raise JournalError(
                f"directive {directive_id} is still {journal.state}: run "
                f"recover_journals first, and purge only after a good boot"
            )
        try:
            with root.open_dir(QUARANTINE_DIR) as qroot:
                st = _lstat(qroot, directive_id)
                if st is not None:
                    if not stat.S_ISDIR(st.st_mode):
                        raise PathRejected(
                            f"{QUARANTINE_DIR}/{directive_id} is {_kind(st.st_mode)}: remove it by hand"
                        )
                    # fd-relative and symlink-safe (shutil.rmtree.avoids_symlink_attacks).
                    shutil.rmtree(directive_id, dir_fd=qroot)
                    os.fsync(qroot)
        except MissingFile:
            pass  # nothing was ever quarantined
        journal.state = "purged"
        journal.notes.append(f"{utcnow().isoformat()} purged {QUARANTINE_DIR}/{directive_id}")
        _write_journal(root, journal)


def list_quarantine(os_root: Path | str) -> list[dict]:
    """Every quarantined file on the OS root, one dict per manifest entry, with the directive
    id, its journal state and whether the stored file is still ``present``."""
    found: list[dict] = []
    with OSRoot(os_root) as root:
        try:
            with root.open_dir(QUARANTINE_DIR) as qroot:
                directive_ids = sorted(n for n in os.listdir(qroot) if _ID_RE.match(n))
        except MissingFile:
            return []
        for directive_id in directive_ids:
            try:
                journal = _read_journal(root, directive_id)
                state = journal.state if journal is not None else "no journal"
            except RemediationError:
                state = "journal unreadable"
            with _Remediation(root, directive_id) as remediation:
                qfd = remediation.qfd(create=False)
                if qfd is None:
                    continue
                for entry in remediation._manifest(qfd).entries:
                    row = entry.model_dump(mode="json")
                    row.update(
                        directive_id=directive_id,
                        journal_state=state,
                        present=_lstat(qfd, entry.stored_name) is not None,
                    )
                    found.append(row)
    return found
