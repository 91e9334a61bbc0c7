"""Filling the tree: the interpreter and stdlib from Debian's packages, the wheels and the
agent into ``dist-packages``.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

from ..checkout import AGENT_PACKAGE
from .prune import PRUNE_WHEEL_EXTENSIONS, PRUNE_WHEEL_NAMES, PRUNE_WHEEL_PREFIXES, PRUNE_WHEEL_SUFFIXES
from .tree import PYTHON, STDLIB, RuntimeBuildError, copy_file


def copy_python(unpacked: dict[str, Path], root: Path) -> None:
    """The interpreter and the stdlib; no docs, no /etc (sitecustomize is pruned)."""
    for tree in unpacked.values():
        for rel in (PYTHON, STDLIB):
            src = tree / rel
            if src.is_file():
                copy_file(src, root / rel)
            elif src.is_dir():
                shutil.copytree(src, root / rel, symlinks=True, dirs_exist_ok=True)
    if not (root / PYTHON).is_file():
        raise RuntimeBuildError(f"{PYTHON} is not in {', '.join(unpacked)}: has Debian renamed its packages?")


def unpack_wheels(wheels: list[Path], site: Path) -> None:
    """Unpack each wheel (a zip): purelib/platlib data go to the site too; scripts, headers
    and data are dropped, and so is what is never imported (PRUNE_WHEEL_*)."""
    site.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                name = info.filename
                parts = name.split("/")
                if parts[0].endswith(".data"):
                    if len(parts) > 2 and parts[1] in ("purelib", "platlib"):
                        parts = parts[2:]
                    else:
                        continue
                if info.is_dir() or not parts[-1]:
                    continue
                if parts[-1] in PRUNE_WHEEL_NAMES or parts[-1].endswith(PRUNE_WHEEL_SUFFIXES):
                    continue
                if name.endswith(".so") and name.startswith(PRUNE_WHEEL_EXTENSIONS):
                    continue
                if name.startswith(PRUNE_WHEEL_PREFIXES):
                    continue
                if any(p in ("", ".", "..") for p in parts) or name.startswith("/"):
                    raise RuntimeBuildError(f"{wheel.name}: unsafe path {name!r}")
                dest = site.joinpath(*parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(zf.read(info))
                dest.chmod(0o644)


def agent_sources() -> list[Path]:
    return sorted(p for p in AGENT_PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def copy_agent(dest: Path) -> None:
    for src in agent_sources():
        copy_file(src, dest / src.relative_to(AGENT_PACKAGE))
