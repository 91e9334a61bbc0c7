"""The shared libraries the tree's ELF files need, taken from their Debian packages.

See :func:`add_libraries`. Every package a library may come from is listed in
:data:`~recovery_lab.pyruntime.download.DEBIAN_LIBRARIES`, so the runtime's cache key covers
its version and a library's security update rebuilds the runtime.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .. import tools
from .download import DEBIAN_LIBRARIES, unpack_deb
from .tree import RuntimeBuildError, copy_file, elf_files

_LDD_LINE = re.compile(r"^\s*(\S+)\s+=>\s+(\S+)\s+\(0x")
_LDD_INTERP = re.compile(r"^\s*(/\S+)\s+\(0x")


def add_libraries(root: Path, debs: Path, versions: dict[str, str]) -> dict[str, list[str]]:
    """Copy the shared libraries the tree's ELF files need from their Debian packages.

    ``ldd`` (the host's loader, which reads the same Debian layout) resolves each ELF file's
    needs; libraries found inside the tree (a wheel's bundled ``.libs``) are skipped. Each
    host path is mapped to its package with ``dpkg -S``; the file is then taken from *that
    package at the candidate version*, not from the host, and copied (symlinks resolved) to
    the same path in the tree. Returns package -> paths copied."""
    needed: dict[str, str] = {}  # host path -> the first tree file that needs it
    for elf in elf_files(root):
        for line in tools.run(["ldd", elf]).splitlines():
            if "not found" in line:
                # A library the tree bundles next to the ELF resolves under chroot; others
                # are reported by check_linking with their name.
                continue
            m = _LDD_LINE.match(line)
            path = m[2] if m else (_LDD_INTERP.match(line) or [None, None])[1]
            if path and not Path(path).resolve().is_relative_to(root.resolve()):
                needed.setdefault(path, "/" + str(elf.relative_to(root)))
    by_package: dict[str, list[str]] = {}
    for path in sorted(needed):
        package = _dpkg_owner(path)
        if package not in DEBIAN_LIBRARIES:
            raise RuntimeBuildError(
                f"{path} (needed by {needed[path]}) comes from Debian package {package}, which "
                f"is not in DEBIAN_LIBRARIES: add it there, or prune what needs it "
                f"(recovery_lab/pyruntime/download.py)"
            )
        by_package.setdefault(package, []).append(path)
    copied: dict[str, list[str]] = {}
    for package, paths in sorted(by_package.items()):
        tree = unpack_deb(debs, package, versions[package])
        for path in paths:
            src = _find_in_package(tree, path)
            if src is None:
                raise RuntimeBuildError(
                    f"{path} is not in {package} {versions[package]} "
                    "(the host's copy is from another version?)"
                )
            rel = src.relative_to(tree)
            # Keep the path the loader asked for (e.g. lib64/ld-linux-x86-64.so.2 is a
            # symlink in libc6): a regular file there, no symlink chains.
            want = Path(path.lstrip("/"))
            target = root / (want if _same_dir_layout(tree, want) else rel)
            copy_file(_resolve_in(tree, src), target)
            copied.setdefault(package, []).append(str(target.relative_to(root)))
    return copied


def _resolve_in(tree: Path, path: Path) -> Path:
    """Follow symlinks as if ``tree`` were the root (libc6's lib64/ld-linux-x86-64.so.2 is an
    absolute symlink, which must not lead to the host's file)."""
    for _ in range(40):
        if not path.is_symlink():
            return path
        target = os.readlink(path)
        path = tree / target.lstrip("/") if target.startswith("/") else path.parent / target
    raise RuntimeBuildError(f"symlink loop at {path}")


def _same_dir_layout(tree: Path, want: Path) -> bool:
    return (tree / want).exists() or (tree / want).is_symlink()


def _find_in_package(tree: Path, host_path: str) -> Path | None:
    """The file of an unpacked package that the host path names, allowing for the merged
    /usr (the host may say /lib/x86_64-linux-gnu where the package says /usr/lib/...)."""
    rel = host_path.lstrip("/")
    candidates = [rel, rel.removeprefix("usr/"), "usr/" + rel]
    for cand in candidates:
        path = tree / cand
        if path.exists():
            return path
    return None


def _dpkg_owner(path: str) -> str:
    """The Debian package that owns a host file (``dpkg -S``), trying the path as given,
    resolved, and with or without the ``/usr`` prefix (merged /usr)."""
    real = os.path.realpath(path)
    tries = []
    for p in (path, real):
        tries += [p, "/usr" + p if not p.startswith("/usr/") else p.removeprefix("/usr")]
    for candidate in dict.fromkeys(tries):
        try:
            out = tools.run(["dpkg", "-S", candidate])
        except tools.ToolFailed:
            continue
        package = out.split(":", 1)[0].strip()
        return package.split(",")[0].strip()
    raise RuntimeBuildError(
        f"no Debian package owns {path} (dpkg -S): is it a library installed outside apt (e.g. /usr/local)?"
    )
