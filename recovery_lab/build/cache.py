"""The stage cache: each stage's output is a directory named by what went into it.

A stage (``Cache.stage("kernel", inputs, build)``) writes its output into a directory
``<stage>-<first 16 hex of sha256(inputs)>`` under the cache root, with an ``inputs.json``
beside the output. Inputs are package versions, the sha256 of the recipe files a stage reads,
the scenario file, and the code of the stage's own ``build`` function (its bytecode, constants
and names as the process loaded them: not its line numbers, and not the file as it is on disk
later, so editing a module while a build runs does not change the keys that build looks up),
so editing what a stage does rebuilds it. Same inputs: the stage prints ``cached`` and the
directory is reused (its ``inputs.json`` touched: the stage's last use). A stage is built in
``<dir>.tmp`` and renamed when complete, so a failed
build leaves no entry; it is checked and built holding ``<dir>.lock``
(:func:`~recovery_lab.locks.build_lock`), so two builds of the same stage at once take turns
and the second reuses the first's output.

Every change of a stage's inputs adds an entry, and the Debian stages are gigabytes each, so
the cache only grows: :func:`prune` (``recovery-lab cache prune``) removes the entries not used
for some days, and a build that fills the disk says so.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import time
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recovery_agent.digest import sha256_bytes, sha256_file

from ..checkout import REPO
from ..errors import LabError
from ..locks import build_lock
from ..tools import ToolError

Log = Callable[[str], None]
# What a stage's output depends on: JSON-able values (versions, hashes, names).
Inputs = dict[str, Any]


class BuildError(LabError):
    """Raised when an image cannot be built: a stage failed (a tool failed, a file is
    missing), the kernel packages cannot be resolved, or a module is missing from the kernel.
    The message names the stage and the cause."""


def default_cache_dir() -> Path:
    """``$QMR_CACHE``, else ``.cache/qmr`` in the repository checkout (git-ignored)."""
    env = os.environ.get("QMR_CACHE")
    return Path(env) if env else REPO / ".cache" / "qmr"


def cache_key(inputs: Inputs) -> str:
    """The sha256 of a stage's inputs (a JSON-able dict), order independent."""
    return sha256_bytes(json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode())


def files_hash(paths: Iterable[Path]) -> dict[str, str]:
    """Recipe files as cache-key inputs: path in the checkout -> sha256."""
    return {str(p.relative_to(REPO)): sha256_file(p) for p in sorted(paths)}


def _const(value: object) -> object:
    """A code constant as stable JSON: nested code by its fingerprint, sets sorted (their
    order changes with the process's hash seed)."""
    if isinstance(value, types.CodeType):
        return _fingerprint(value)
    if isinstance(value, tuple):
        return [_const(v) for v in value]
    if isinstance(value, frozenset):
        return sorted(json.dumps(_const(v)) for v in value)
    return repr(value)


def _fingerprint(code: types.CodeType) -> list[object]:
    return [code.co_code.hex(), [_const(c) for c in code.co_consts], code.co_names, code.co_varnames]


def _code_hash(fn: Callable[[Path], None]) -> str:
    code = getattr(fn, "__code__", None)
    if code is None:
        return "unknown"
    return sha256_bytes(json.dumps(_fingerprint(code)).encode())


@dataclass
class Cache:
    """Stage outputs under ``root``, one directory per (stage, inputs)."""

    root: Path
    log: Log = print

    def stage(self, name: str, inputs: Inputs, build: Callable[[Path], None], label: str = "") -> Path:
        """The output directory of stage ``name`` for ``inputs``; ``build(tmpdir)`` fills it
        if it is not in the cache yet. Raises :class:`BuildError` if ``build`` fails."""
        inputs = {**inputs, "stage": name, "code": _code_hash(build)}
        key = cache_key(inputs)
        out = self.root / f"{name}-{key[:16]}"
        what = f"[{name}{' ' + label if label else ''}]"
        with build_lock(self.root / f"{name}-{key[:16]}.lock", self.log):
            if (out / "inputs.json").exists():
                (out / "inputs.json").touch()  # its last use, for prune
                self.log(f"{what} cached ({out.name})")
                return out
            tmp = self.root / f"{name}-{key[:16]}.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            started = time.monotonic()
            self.log(f"{what} building ...")
            try:
                build(tmp)
            except (ToolError, OSError, ValueError) as exc:
                hint = ""
                if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                    hint = (
                        " (the disk is full: `recovery-lab cache prune` removes the stages "
                        f"unused for {PRUNE_DAYS} days)"
                    )
                raise BuildError(f"stage {name}: {exc}{hint}") from exc
            (tmp / "inputs.json").write_text(json.dumps(inputs, indent=2, sort_keys=True) + "\n")
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
            self.log(f"{what} built in {time.monotonic() - started:.1f}s ({out.name})")
            return out


# Stages not used for this many days are what ``recovery-lab cache prune`` removes by default.
PRUNE_DAYS = 7
_STAGE_DIR = re.compile(r"^[a-z0-9-]+-[0-9a-f]{16}(\.tmp)?$")


@dataclass(frozen=True)
class Pruned:
    removed: list[str]
    freed_bytes: int


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def prune(
    root: Path, unused_days: float = PRUNE_DAYS, *, dry_run: bool = False, now: float | None = None
) -> Pruned:
    """Remove the stage entries under ``root`` last used more than ``unused_days`` ago, and
    builds left half-done (``.tmp``) as long ago; an entry whose build lock another process
    holds (a build running now) is left alone. With ``dry_run``, only say which."""
    cutoff = (time.time() if now is None else now) - unused_days * 86400
    removed, freed = [], 0
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if not entry.is_dir() or not _STAGE_DIR.match(entry.name):
            continue
        with _unless_busy(root / (entry.name.removesuffix(".tmp") + ".lock")) as free:
            if not free or _last_use(entry) >= cutoff:
                continue
            size = _size(entry)
            if not dry_run:
                shutil.rmtree(entry)
        removed.append(entry.name)
        freed += size
    return Pruned(removed, freed)


def _last_use(entry: Path) -> float:
    marker = entry / "inputs.json"
    return (marker if marker.exists() else entry).stat().st_mtime


@contextlib.contextmanager
def _unless_busy(lock_file: Path) -> Iterator[bool]:
    """Hold ``lock_file`` if nobody does (True), else do not wait (False)."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
