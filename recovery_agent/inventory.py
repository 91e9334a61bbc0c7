"""What the agent reports about the OS it is trying to recover (the "collect" step).

This module owns reading the OS root, the broken machine's root filesystem mounted inside the
recovery environment, and describing it: the OS and kernel version, the out-of-tree kernel
drivers, the driver store of previous driver versions, the sensor's channel files, and which
of those files changed most recently (the usual suspects after a bad update).

Files are identified by content (sha256), size and mtime, never by name alone: the bad and
the fixed channel file 291 differed only in their timestamp. Paths are reported relative to
the OS root, with ``/`` and no leading slash, as remediations name them.

The OS root is untrusted and may be damaged: symlinks are never followed (a link could point
at the recovery environment's own files), only regular files are read, and a file that cannot
be read is left out with a warning rather than stopping the report. Merged-/usr systems, where
``lib`` is a symlink to ``usr/lib``, are handled by looking in ``usr/lib`` directly.

Whatever the tree holds, the listing is bounded (docs/recovery-loop.md, "The limits of a
report"), and what was left out is said in the notes the caller passes (``notes``):

- at most ``FILES_PER_KIND`` files of each kind are listed: the files the crash names first,
  then the most recently changed ("channel_files: 5000 found, 1000 listed (...)");
- at most ``DIR_ENTRIES_LIMIT`` entries of one directory are looked at, and driver folders
  ``WALK_DEPTH_LIMIT`` levels deep;
- a file over ``HASH_SIZE_LIMIT`` bytes is not hashed, so not listed;
- a name that is not UTF-8, or a path over ``wire.PATH_MAX`` characters, cannot be named in a
  remediation: it is left out, and counted.

``collect`` gathers the whole inventory for a report in one call.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .digest import sha256_fd
from .errors import AgentError
from .layout import CHANNEL_DIR, DRIVER_STORE, DRIVER_SUBDIRS, HOSTNAME_FILE, MODULES_DIRS, OS_RELEASE_FILES
from .protocol.wire import PATH_MAX, FileRecord, PathRuleError, SystemInfo, check_relative_path
from .report import wire_text

log = logging.getLogger(__name__)

FILES_PER_KIND = 1000  # files listed per kind (drivers, channel files, driver store)
DIR_ENTRIES_LIMIT = 100_000  # entries looked at in one directory
WALK_DEPTH_LIMIT = 8  # directories below lib/modules/<kver>/{extra,updates}
HASH_SIZE_LIMIT = 256 * 1024 * 1024  # larger files are not hashed (and so not listed)

CHANNEL_FILE_RE = re.compile(r"^C-.*\.sys$")
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
_VERSION_MAX = 64
_MODINFO_LIMIT = 64 * 1024 * 1024  # larger .ko files are not scanned for a version


class InventoryError(AgentError):
    """Raised when the OS root itself cannot be read (not mounted, not a directory)."""


# --------------------------------------------------------------------------- safe paths


def _check_root(os_root: Path) -> Path:
    try:
        st = os.stat(os_root)
    except FileNotFoundError:
        raise InventoryError(
            f"OS root {os_root} does not exist: mount the OS partition there first"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise InventoryError(
            f"OS root {os_root} is not a directory: mount the OS partition "
            f"on an empty directory and pass that"
        )
    return Path(os_root)


def _real_dir(root: Path, rel: str) -> Path | None:
    """``root/rel`` if every component of ``rel`` is a real directory (no symlinks)."""
    path = root
    for part in rel.split("/"):
        path = path / part
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            return None
    return path


def _scandir(path: Path, notes: list[str] | None = None) -> list[os.DirEntry[str]]:
    """The entries of ``path`` by name, at most ``DIR_ENTRIES_LIMIT`` of them."""
    entries: list[os.DirEntry[str]] = []
    try:
        with os.scandir(path) as it:
            for entry in it:
                if len(entries) >= DIR_ENTRIES_LIMIT:
                    _note(notes, f"{path}: more than {DIR_ENTRIES_LIMIT} entries; the rest not looked at")
                    break
                entries.append(entry)
    except OSError as e:
        log.warning("cannot list %s: %s", path, e.strerror)
    return sorted(entries, key=lambda e: e.name)


def _note(notes: list[str] | None, text: str) -> None:
    log.warning("%s", text)
    if notes is not None:
        notes.append(wire_text(text, 512))


def _subdirs(path: Path, notes: list[str] | None = None) -> list[os.DirEntry[str]]:
    return [e for e in _scandir(path, notes) if e.is_dir(follow_symlinks=False)]


def _walk_files(path: Path, notes: list[str] | None = None) -> list[os.DirEntry[str]]:
    """Regular files under ``path``, at most ``WALK_DEPTH_LIMIT`` directories deep, without
    following symlinks; in the order of a depth-first walk by name."""
    found: list[os.DirEntry[str]] = []
    stack: list[tuple[Path, int]] = [(path, 0)]
    too_deep = 0
    while stack:
        directory, depth = stack.pop()
        subdirs: list[Path] = []
        for entry in _scandir(directory, notes):
            if entry.is_dir(follow_symlinks=False):
                if depth < WALK_DEPTH_LIMIT:
                    subdirs.append(Path(entry.path))
                else:
                    too_deep += 1
            elif entry.is_file(follow_symlinks=False):
                found.append(entry)
        stack.extend((d, depth + 1) for d in reversed(subdirs))
    if too_deep:
        _note(notes, f"{path}: {too_deep} folders deeper than {WALK_DEPTH_LIMIT} levels not looked at")
    return found


def _rel(root: Path, path: str | Path) -> str:
    text, base = str(path), str(root).rstrip("/") + "/"
    if text.startswith(base):  # the usual case, without pathlib's cost per file
        return text[len(base) :]
    return Path(path).relative_to(root).as_posix()


def _version_key(name: str) -> list[tuple[int, int | str]]:
    """Natural order: 6.1.0-27 sorts after 6.1.0-9. (A run of what ``\\d`` matches is what
    ``int`` reads; ``isdigit`` would also take a superscript ``¹``, which ``int`` refuses.)"""
    return [(0, int(p)) if p.isdecimal() else (1, p) for p in re.split(r"(\d+)", name) if p]


# --------------------------------------------------------------------------- files


def _modinfo_version(f: BinaryIO, size: int) -> str | None:
    """The ``version=`` string from a kernel module's ``.modinfo`` ELF section, or from a scan
    of the whole file if the ELF headers cannot be read."""
    if size > _MODINFO_LIMIT:
        return None
    f.seek(0)
    data = f.read()
    section = _elf_section(data, b".modinfo")
    if section is not None:
        for entry in section.split(b"\x00"):
            if entry.startswith(b"version="):
                return _clean_version(entry[len(b"version=") :])
        return None
    at = data.find(b"\x00version=")
    if at < 0:
        return None
    end = data.find(b"\x00", at + 1)
    return _clean_version(data[at + len(b"\x00version=") : end if end >= 0 else None])


def _clean_version(raw: bytes) -> str | None:
    text = raw[:_VERSION_MAX].decode("ascii", errors="replace").strip()
    return text or None


def _elf_section(data: bytes, name: bytes) -> bytes | None:
    """The contents of section ``name`` of an ELF file, or None if it is not readable ELF."""
    if len(data) < 64 or data[:4] != b"\x7fELF":
        return None
    ei_class, ei_data = data[4], data[5]
    endian = {1: "<", 2: ">"}.get(ei_data)
    if endian is None or ei_class not in (1, 2):
        return None
    try:
        if ei_class == 2:
            (shoff,) = struct.unpack_from(endian + "Q", data, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from(endian + "HHH", data, 0x3A)
            sh_fmt, name_at, off_at = endian + "IIQQQQ", 0, 4
        else:
            (shoff,) = struct.unpack_from(endian + "I", data, 0x20)
            shentsize, shnum, shstrndx = struct.unpack_from(endian + "HHH", data, 0x2E)
            sh_fmt, name_at, off_at = endian + "IIIIII", 0, 4

        def header(i: int) -> tuple[int, int, int]:
            fields = struct.unpack_from(sh_fmt, data, shoff + i * shentsize)
            return fields[name_at], fields[off_at], fields[off_at + 1]

        if shnum == 0 or shstrndx >= shnum:
            return None
        _, str_off, str_size = header(shstrndx)
        strtab = data[str_off : str_off + str_size]
        for i in range(shnum):
            sh_name, sh_off, sh_size = header(i)
            end = strtab.find(b"\x00", sh_name)
            if strtab[sh_name:end] == name:
                if sh_off + sh_size > len(data):
                    return None
                return data[sh_off : sh_off + sh_size]
    except struct.error:
        return None
    return None


def file_record(
    os_root: Path, path: str | Path, *, module_version: bool = False, version: str | None = None
) -> FileRecord | None:
    """Describe one regular file under ``os_root``: relative path, size, mtime, sha256 and,
    for kernel modules, the ``version=`` from ``.modinfo``. None if it is not a regular file
    or cannot be read (a warning is logged)."""
    root = Path(os_root)
    rel = _rel(root, path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        log.warning("cannot open %s in the OS root: %s", rel, e.strerror)
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None
        try:
            digest = sha256_fd(f.fileno())
            if module_version and version is None and rel.endswith(".ko"):
                version = _modinfo_version(f, st.st_size)
        except OSError as e:
            log.warning("cannot read %s in the OS root: %s", rel, e.strerror)
            return None
    return FileRecord(
        path=rel,
        size=st.st_size,
        mtime=st.st_mtime,
        sha256=digest,
        version=version[:_VERSION_MAX] if version else None,
    )


# --------------------------------------------------------------------------- system


def _modules_root(root: Path) -> Path | None:
    for rel in MODULES_DIRS:
        path = _real_dir(root, rel)
        if path is not None:
            return path
    return None


def _read_small(path: Path, limit: int = 64 * 1024) -> str | None:
    """The start of the regular file at ``path`` (never a symlink, a FIFO or a device)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        return f.read(limit).decode("utf-8", errors="replace")


def _os_release(root: Path) -> str:
    for rel in OS_RELEASE_FILES:  # the fallback instead of following a symlink
        text = _read_small(root / rel)
        if text is None:
            continue
        values: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key):
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                    value = value[1:-1]
                values[key] = value
        name = values.get("PRETTY_NAME") or " ".join(
            v for v in (values.get("NAME"), values.get("VERSION")) if v
        )
        if name:
            return wire_text(name, 256)
    return ""


def kernel_version(os_root: Path) -> str:
    """The OS's kernel version: the ``lib/modules/<kver>`` directory (the one holding
    ``extra/`` if several), else the newest ``boot/vmlinuz-<kver>``; "" if none."""
    root = Path(os_root)
    modules = _modules_root(root)
    if modules is not None:
        kvers = [e.name for e in _subdirs(modules)]
        with_extra = [k for k in kvers if _real_dir(modules, f"{k}/extra") is not None]
        candidates = with_extra or kvers
        if candidates:
            return wire_text(max(candidates, key=_version_key), 128)
    boot = _real_dir(root, "boot")
    if boot is not None:
        kernels = [
            e.name[len("vmlinuz-") :]
            for e in _scandir(boot)
            if e.name.startswith("vmlinuz-") and e.is_file(follow_symlinks=False)
        ]
        if kernels:
            return wire_text(max(kernels, key=_version_key), 128)
    return ""


def collect_system(os_root: Path) -> SystemInfo:
    """OS name (``PRETTY_NAME``), kernel version and hostname of the OS root."""
    root = _check_root(Path(os_root))
    hostname = (_read_small(root / HOSTNAME_FILE) or "").strip().splitlines()
    return SystemInfo(
        os_release=_os_release(root),
        kernel_version=kernel_version(root),
        hostname=wire_text(hostname[0].strip() if hostname else "", 255),
    )


# --------------------------------------------------------------------------- listing


@dataclass
class _Candidate:
    """A file of one kind found by the walk, before it is chosen and hashed."""

    entry: os.DirEntry[str]
    relpath: str
    mtime: float
    version: str | None = None


# Which of a kind's files to list first: those the crash names (e.g. its channel file).
Preferred = Callable[[str], bool]


def _listed(
    root: Path,
    kind: str,
    entries: Iterable[tuple[os.DirEntry[str], str | None]],
    notes: list[str] | None,
    *,
    limit: int,
    first: Preferred | None,
    module_version: bool = False,
) -> list[FileRecord]:
    """Records of at most ``limit`` of ``entries`` (with a version each, or None): the preferred
    ones, then the most recently changed; in the walk's order. What is left out is noted."""
    candidates: list[_Candidate] = []
    unnamed = too_big = 0
    for entry, version in entries:
        relpath = _rel(root, entry.path)
        try:
            relpath.encode("utf-8")
            if len(relpath) > PATH_MAX:
                raise PathRuleError(relpath)
            check_relative_path(relpath)
            st = entry.stat(follow_symlinks=False)
        except (UnicodeEncodeError, PathRuleError):
            unnamed += 1
            continue
        except OSError:
            continue
        if st.st_size > HASH_SIZE_LIMIT:
            too_big += 1
            continue
        candidates.append(_Candidate(entry, relpath, st.st_mtime, version))
    if unnamed:
        _note(
            notes,
            f"{kind}: {unnamed} files left out: their names are not UTF-8 or their paths are "
            f"over {PATH_MAX} characters",
        )
    if too_big:
        _note(notes, f"{kind}: {too_big} files over {HASH_SIZE_LIMIT} bytes left out (not hashed)")
    chosen = candidates
    if len(candidates) > limit:
        order = sorted(
            range(len(candidates)),
            key=lambda i: (
                not (first is not None and first(candidates[i].relpath)),
                -candidates[i].mtime,
                candidates[i].relpath,
            ),
        )
        keep = set(order[:limit])
        chosen = [c for i, c in enumerate(candidates) if i in keep]
        how = "the files the crash names first, then " if first is not None else ""
        _note(
            notes,
            f"{kind}: {len(candidates)} found, {limit} listed ({how}most recently changed first)",
        )
    records: list[FileRecord] = []
    for c in chosen:
        rec = file_record(root, c.entry.path, module_version=module_version, version=c.version)
        if rec is not None:
            records.append(rec)
    return records


# --------------------------------------------------------------------------- drivers


def _is_module(name: str) -> bool:
    return name.endswith(MODULE_SUFFIXES)


def module_of(path: str) -> str:
    """The kernel module a ``.ko`` file holds, as the kernel names it (``-`` becomes ``_``)."""
    return path.rsplit("/", 1)[-1].split(".ko")[0].replace("-", "_")


def collect_drivers(
    os_root: Path,
    *,
    notes: list[str] | None = None,
    limit: int = FILES_PER_KIND,
    first: Preferred | None = None,
) -> list[FileRecord]:
    """Out-of-tree kernel modules: ``lib/modules/<kver>/{extra,updates}/**/*.ko`` for every
    installed kernel, with the version from each module's ``.modinfo``."""
    root = _check_root(Path(os_root))
    modules = _modules_root(root)
    if modules is None:
        return []
    entries: list[tuple[os.DirEntry[str], str | None]] = []
    for kver in _subdirs(modules, notes):
        for sub in DRIVER_SUBDIRS:
            base = _real_dir(modules, f"{kver.name}/{sub}")
            if base is None:
                continue
            entries += [(e, None) for e in _walk_files(base, notes) if _is_module(e.name)]
    return _listed(root, "drivers", entries, notes, limit=limit, first=first, module_version=True)


def collect_driver_store(
    os_root: Path,
    *,
    notes: list[str] | None = None,
    limit: int = FILES_PER_KIND,
    first: Preferred | None = None,
) -> list[FileRecord]:
    """The driver store: ``var/lib/driver-store/<driver>/<version>/<driver>.ko``, the copies a
    ``restore_file`` remediation can roll back to. The version is the store's directory name,
    the key remediations use."""
    root = _check_root(Path(os_root))
    store = _real_dir(root, DRIVER_STORE)
    if store is None:
        return []
    entries: list[tuple[os.DirEntry[str], str | None]] = []
    for driver in _subdirs(store, notes):
        for version in _subdirs(Path(driver.path), notes):
            entries += [
                (entry, wire_text(version.name, _VERSION_MAX))
                for entry in _scandir(Path(version.path), notes)
                if entry.is_file(follow_symlinks=False)
                and _is_module(entry.name)
                and entry.name.split(".ko")[0] == driver.name
            ]
    return _listed(root, "driver_store", entries, notes, limit=limit, first=first)


def collect_channel_files(
    os_root: Path,
    *,
    notes: list[str] | None = None,
    limit: int = FILES_PER_KIND,
    first: Preferred | None = None,
) -> list[FileRecord]:
    """The sensor's channel files: ``var/lib/sensor/channels/C-*.sys``."""
    root = _check_root(Path(os_root))
    channels = _real_dir(root, CHANNEL_DIR)
    if channels is None:
        return []
    entries = [
        (entry, None)
        for entry in _scandir(channels, notes)
        if entry.is_file(follow_symlinks=False) and CHANNEL_FILE_RE.match(entry.name)
    ]
    return _listed(root, "channel_files", entries, notes, limit=limit, first=first)


@dataclass
class Inventory:
    """What the collect step reports about the OS root, and what it left out."""

    system: SystemInfo
    drivers: list[FileRecord]
    channel_files: list[FileRecord]
    driver_store: list[FileRecord]
    notes: list[str] = field(default_factory=list)


def collect(os_root: Path, *, channel_file: str | None = None, module: str | None = None) -> Inventory:
    """The whole inventory for a report. The crash's channel file and guilty module, if given,
    are listed whatever the limits (a remediation will name them). Raises ``InventoryError``
    if the OS root cannot be read at all."""
    notes: list[str] = []
    wanted = module.replace("-", "_") if module else None
    by_module: Preferred | None = (lambda p: module_of(p) == wanted) if wanted else None
    by_path: Preferred | None = (lambda p: p == channel_file) if channel_file else None
    return Inventory(
        system=collect_system(os_root),
        drivers=collect_drivers(os_root, notes=notes, first=by_module),
        channel_files=collect_channel_files(os_root, notes=notes, first=by_path),
        driver_store=collect_driver_store(os_root, notes=notes, first=by_module),
        notes=notes,
    )


def recent_changes(records: Iterable[FileRecord], limit: int = 10) -> list[FileRecord]:
    """The ``limit`` most recently modified files, newest first (ties by path)."""
    ordered = sorted(records, key=lambda r: r.path)
    ordered.sort(key=lambda r: r.mtime, reverse=True)
    return ordered[: max(limit, 0)]
