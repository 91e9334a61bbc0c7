"""Filling the tree: the interpreter and stdlib from Debian's packages, the wheels and the
agent into ``dist-packages``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from recovery_agent.install.wheel import UnsafeWheel, unpack_wheel

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


def _pruned(name: str, filename: str) -> bool:
    """What the recovery environment never imports (PRUNE_WHEEL_*)."""
    return (
        filename in PRUNE_WHEEL_NAMES
        or filename.endswith(PRUNE_WHEEL_SUFFIXES)
        or (name.endswith(".so") and name.startswith(PRUNE_WHEEL_EXTENSIONS))
        or name.startswith(PRUNE_WHEEL_PREFIXES)
    )


def unpack_wheels(wheels: list[Path], site: Path) -> None:
    """Unpack each wheel as the install does (:mod:`recovery_agent.install.wheel`), less
    what is never imported."""
    site.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        try:
            unpack_wheel(wheel, site, skip=_pruned)
        except UnsafeWheel as e:
            raise RuntimeBuildError(str(e)) from None


def agent_sources() -> list[Path]:
    return sorted(p for p in AGENT_PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def copy_agent(dest: Path) -> None:
    for src in agent_sources():
        copy_file(src, dest / src.relative_to(AGENT_PACKAGE))
