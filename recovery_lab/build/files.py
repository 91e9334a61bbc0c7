"""Reproducible files, trees and filesystem images, made from directories.

The stages build a root directory and turn it into an image here: a gzip'd newc cpio for an
initramfs (:func:`newc_initramfs`), an ext4 image for a partition (:func:`mkfs_ext4`). The same
directory gives the same bytes: every mtime is :data:`~recovery_lab.reproducible.EPOCH`,
archive entries are sorted and owned by 0:0, filesystems get fixed UUIDs and hash seeds, and
what the tools stamp with the current time is rewritten (see each function). External tools
run through :func:`recovery_lab.tools.run`.
"""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from ..disk import MIB
from ..reproducible import EPOCH, set_mtimes
from ..tools import FILES, run

BUSYBOX = next(path for path, pkg in FILES.items() if pkg == "busybox-static")


def write_file(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` (replacing a file or symlink there) with ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)


def _busybox_applets(busybox: Path) -> list[str]:
    """Applet paths (``bin/ls``, ``sbin/ifconfig``, ...) from ``busybox --list-full``."""
    return sorted(set(run([busybox, "--list-full"]).split()))


def install_busybox(root: Path, skip: Iterable[str] = ()) -> None:
    """busybox-static at ``bin/busybox`` and a symlink for each applet, but those in ``skip``
    (a root that brings its own ``sbin/init``, say)."""
    busybox = Path(BUSYBOX)
    write_file(root / "bin" / "busybox", busybox.read_bytes(), 0o755)
    skip = set(skip)
    for applet in _busybox_applets(busybox):
        if applet in skip or applet == "bin/busybox":
            continue
        link = root / applet
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists() and not link.is_symlink():
            link.symlink_to("/bin/busybox")


def newc_initramfs(root: Path, out: Path) -> None:
    """``root`` as a gzip'd newc cpio, entries sorted, owner 0:0, fixed mtimes, no gzip
    timestamp."""
    set_mtimes(root)
    names = ["."] + sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    raw = out.with_suffix(".cpio")
    run(
        ["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0", "--reproducible"],
        cwd=root,
        input=("\n".join(names) + "\n").encode(),
        stdout_to=raw,
    )
    with open(raw, "rb") as f, open(out, "wb") as g:
        with gzip.GzipFile(filename="", mode="wb", fileobj=g, compresslevel=9, mtime=0) as z:
            shutil.copyfileobj(f, z)
    raw.unlink()


def mkfs_ext4(root: Path, out: Path, size_mib: int, uuid: str, hash_seed: str, label: str) -> None:
    """An ext4 image of directory ``root``, reproducible: fixed UUID, hash seed, timestamps.

    ``mkfs.ext4 -d`` copies each inode's ctime from the host file, which cannot be set, so
    debugfs rewrites every ctime afterwards (E2FSPROGS_FAKE_TIME fixes the rest)."""
    set_mtimes(root)
    if out.exists():
        out.unlink()
    with open(out, "wb") as f:
        f.truncate(size_mib * MIB)
    env = {"E2FSPROGS_FAKE_TIME": str(EPOCH), "SOURCE_DATE_EPOCH": str(EPOCH)}
    run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            label,
            "-U",
            uuid,
            "-E",
            f"hash_seed={hash_seed},root_owner=0:0,lazy_itable_init=0,nodiscard",
            "-d",
            root,
            out,
        ],
        env=env,
    )
    # atime too: reading a directory while copying it updates its atime (relatime).
    cmds = []
    for path in ["/", "/lost+found"] + [f"/{p.relative_to(root)}" for p in sorted(root.rglob("*"))]:
        cmds += [f"sif {path} ctime @{EPOCH}", f"sif {path} atime @{EPOCH}"]
    script = out.with_suffix(".debugfs")
    script.write_text("\n".join(cmds) + "\n")
    run(["debugfs", "-w", "-f", script, out], env=env)
    script.unlink()
