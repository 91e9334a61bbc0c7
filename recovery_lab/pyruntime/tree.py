"""The runtime tree: where things go in it, what a built one is, and the file helpers.

The tree is laid out as Debian lays out the same files, so it can be merged into a root
filesystem as is: the interpreter at :data:`PYTHON`, the stdlib in :data:`STDLIB`, the wheels
and the agent in :data:`SITE` (on ``sys.path`` through Debian's ``site.py``), the shared
libraries at Debian's paths.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import LabError

PYTHON_VERSION = "3.11"
PYTHON = f"usr/bin/python{PYTHON_VERSION}"
STDLIB = f"usr/lib/python{PYTHON_VERSION}"
SITE = "usr/lib/python3/dist-packages"  # on sys.path through Debian's site.py
ARCH = "amd64"
MULTIARCH = "x86_64-linux-gnu"

# Where the build reports its steps (print, or a test's list.append).
Progress = Callable[[str], None]


class RuntimeBuildError(LabError):
    """Raised when the runtime cannot be built: a package or wheel cannot be had, a library's
    package is not in :data:`~recovery_lab.pyruntime.download.DEBIAN_LIBRARIES`, or the built
    tree fails its checks under chroot. The message names the step and the fix."""


@dataclass(frozen=True)
class RuntimeArtifact:
    """A built runtime. ``root`` is merged into the recovery environment's root; ``python`` is
    the interpreter's path inside it; ``manifest`` (beside ``root``) records the inputs."""

    root: Path
    size_bytes: int
    files: int
    key: str
    python: str = PYTHON
    cached: bool = False

    @property
    def manifest(self) -> Path:
        return self.root.parent / "manifest.json"


def copy_file(src: Path, dest: Path) -> None:
    """Copy a file's bytes (replacing what is at ``dest``), mode 0755 if it was executable
    for its owner, else 0644: the tree's modes do not depend on the host's umask."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink() or dest.exists():
        dest.unlink()
    shutil.copyfile(src, dest)
    mode = os.stat(src).st_mode
    dest.chmod(0o755 if mode & stat.S_IXUSR else 0o644)


def elf_files(root: Path) -> Iterator[Path]:
    """Every regular file under ``root`` that starts with the ELF magic, in sorted order."""
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as f:
                if f.read(4) == b"\x7fELF":
                    yield path


def measure(root: Path) -> tuple[int, int]:
    """The bytes and the number of regular files under ``root``."""
    size = files = 0
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            size += path.stat().st_size
            files += 1
    return size, files
