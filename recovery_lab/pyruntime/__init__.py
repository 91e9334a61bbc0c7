"""The Python runtime of the recovery environment: Debian's python3.11, the agent's wheels and
the agent, as one directory tree to merge into the recovery environment's root filesystem.

The workflow of :func:`build_python_runtime`:

1. **inputs**: the candidate versions of Debian's python3.11 packages and of the libraries it
   may need (``apt-cache policy``), the exact versions of the agent's dependencies installed in
   this project's environment (``importlib.metadata``), the agent's source files and this
   package's own source. Their sha256 is the cache key; a tree built from the same inputs is
   reused ("cached").                                                         (download.py)
2. **wheels**: ``pip download --only-binary=:all:`` for CPython 3.11 on manylinux up to the
   glibc of the Debian ``libc6`` that goes into the tree, pinned to the installed versions.
                                                                              (download.py)
3. **debs**: ``apt-get download`` of python3.11-minimal, libpython3.11-minimal and
   libpython3.11-stdlib, unpacked with ``dpkg-deb -x``; the interpreter and the stdlib are
   copied into the tree and the stdlib is pruned (:data:`~.prune.PRUNE_STDLIB`).
                                                         (download.py, unpack.py, prune.py)
4. **site**: the wheels are unpacked into ``usr/lib/python3/dist-packages`` (Debian's site.py
   puts it on ``sys.path``), with the agent package (``recovery_agent`` only); what is never
   imported is left out and the wheels' extension modules are stripped.
                                                                      (unpack.py, prune.py)
5. **libraries**: ``ldd`` on every ELF file in the tree names the shared libraries it needs;
   ``dpkg -S`` names the Debian package of each; that package (which must be one of
   :data:`~.download.DEBIAN_LIBRARIES`, so the cache key covers its version) is downloaded
   and only the needed ``.so`` files are copied, at the paths Debian puts them.
                                                                             (libraries.py)
6. **check**: under ``chroot`` (no host file is visible) the tree's own ``ld.so --list`` must
   resolve every ELF file.                                                      (chroot.py)
7. **compile**: ``compileall --invalidation-mode unchecked-hash`` by the tree's own interpreter
   under chroot; the stdlib and the wheels keep only their ``.pyc`` (sourceless, about half the
   bytes), the agent keeps its ``.py`` too, for tracebacks with source lines. Then, under
   chroot, isolated (``-I``), the tree's interpreter must import ``recovery_agent.cli`` and
   ``recovery_agent.agent`` with ``sys.prefix`` ``/usr``.                        (chroot.py)
8. Every file gets the fixed mtime :data:`~recovery_lab.reproducible.EPOCH`; a
   ``manifest.json`` beside the tree records what went in.

The build needs root (``chroot``) and network access to apt and PyPI, the first time only.
Public API: :func:`build_python_runtime` -> :class:`RuntimeArtifact`; the tree's layout
(:data:`PYTHON`, :data:`STDLIB`, :data:`SITE`) and :class:`RuntimeBuildError` come from
:mod:`~recovery_lab.pyruntime.tree`.
"""

from __future__ import annotations

import json
import shutil
import time
import zipfile
from pathlib import Path
from types import TracebackType
from typing import Literal

from recovery_agent.digest import sha256_bytes, sha256_file

from .. import tools
from ..checkout import REPO
from ..reproducible import EPOCH, set_mtimes
from .chroot import check_import, check_linking, compile_tree
from .download import (
    DEBIAN_LIBRARIES,
    DEBIAN_PYTHON,
    candidate_versions,
    download_wheels,
    glibc_version,
    installed_pins,
    unpack_deb,
)
from .libraries import add_libraries
from .prune import prune_stdlib, strip_wheel_extensions
from .tree import PYTHON, SITE, STDLIB, Progress, RuntimeArtifact, RuntimeBuildError, measure
from .unpack import agent_sources, copy_agent, copy_python, unpack_wheels

__all__ = ["PYTHON", "SITE", "STDLIB", "RuntimeArtifact", "RuntimeBuildError", "build_python_runtime"]


def build_python_runtime(cache_dir: Path, *, progress: Progress = print) -> RuntimeArtifact:
    """Build (or reuse from ``cache_dir``) the runtime tree; see the module docstring."""
    cache = Path(cache_dir) / "pyruntime"
    cache.mkdir(parents=True, exist_ok=True)
    step = _Steps(progress)
    tools.require("apt-cache", "apt-get", "dpkg-deb", "dpkg", "ldd", "chroot", "strip")

    with step("inputs"):
        versions = candidate_versions(DEBIAN_PYTHON + DEBIAN_LIBRARIES)
        pins = installed_pins()
    with step("wheels"):
        wheels = download_wheels(cache / "wheels", pins, glibc_version(versions["libc6"]), progress)
    inputs = {
        "debian": versions,
        "wheels": {w.name: sha256_file(w) for w in wheels},
        "agent": {str(p.relative_to(REPO)): sha256_file(p) for p in agent_sources()},
        "code": {p.name: sha256_file(p) for p in sorted(Path(__file__).parent.glob("*.py"))},
        "epoch": EPOCH,
    }
    key = sha256_bytes(json.dumps(inputs, sort_keys=True).encode())[:16]
    out = cache / f"tree-{key}"
    if (out / "manifest.json").is_file():
        artifact = _artifact(out / "root", key, cached=True)
        progress(
            f"[pyruntime] cached ({out.name}: {artifact.size_bytes / 1e6:.1f} MB, {artifact.files} files)"
        )
        return artifact

    tmp = cache / f"tree-{key}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    root = tmp / "root"
    root.mkdir(parents=True)
    debs = cache / "debs"
    with step("python packages (apt-get download, dpkg-deb -x)"):
        unpacked = {p: unpack_deb(debs, p, versions[p]) for p in DEBIAN_PYTHON}
        copy_python(unpacked, root)
    with step("prune stdlib"):
        pruned = prune_stdlib(root / STDLIB)
    with step("wheels and agent into dist-packages"):
        unpack_wheels(wheels, root / SITE)
        copy_agent(root / SITE / "recovery_agent")
    with step("strip the wheels' extension modules"):
        stripped = strip_wheel_extensions(root / SITE)
    with step("shared libraries (ldd, dpkg -S)"):
        libraries = add_libraries(root, debs, versions)
    with step("check: ld.so --list under chroot"):
        check_linking(root)
    with step("compile .pyc under chroot"):
        source_bytes = compile_tree(root)
    with step("check: import the agent under chroot"):
        import_s, modules = check_import(root)
    set_mtimes(root)
    size, files = measure(root)
    manifest = {
        "key": key,
        "inputs": inputs,
        "python": PYTHON,
        "libraries": libraries,
        "pruned": pruned,
        "stripped_bytes": stripped,
        "size_bytes": size,
        "files": files,
        "dropped_source_bytes": source_bytes,
        "import_check_s_host": import_s,
        "modules_at_import": modules,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    progress(
        f"[pyruntime] built {out.name} in {step.total():.1f}s: {size / 1e6:.1f} MB, "
        f"{files} files, {len(modules)} modules imported by the agent "
        f"in {import_s:.2f}s (host)"
    )
    return _artifact(out / "root", key, cached=False)


class _Steps:
    """``with step("name"):`` prints the step and its duration; errors name the step."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.started = time.monotonic()
        self._name = ""

    def __call__(self, name: str) -> _Steps:
        self._name = name
        return self

    def __enter__(self) -> None:
        self._t0 = time.monotonic()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:
        if exc is None:
            self.progress(f"[pyruntime] {self._name}: {time.monotonic() - self._t0:.1f}s")
        elif not isinstance(exc, RuntimeBuildError) and isinstance(
            exc, (tools.ToolError, OSError, ValueError, zipfile.BadZipFile)
        ):
            raise RuntimeBuildError(f"python runtime, step {self._name!r}: {exc}") from exc
        return False

    def total(self) -> float:
        return time.monotonic() - self.started


def _artifact(root: Path, key: str, *, cached: bool) -> RuntimeArtifact:
    size, files = measure(root)
    return RuntimeArtifact(root=root, size_bytes=size, files=files, key=key, cached=cached)
