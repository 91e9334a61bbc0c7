"""The steps that run the tree itself, under ``chroot`` with an empty environment, so nothing
of the host is seen: the link check (the tree's own loader resolves every ELF file), compiling
the ``.pyc`` with the tree's own interpreter, and the import check (that interpreter,
isolated, imports the agent with ``sys.prefix`` ``/usr``).
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import tools
from .tree import PYTHON, SITE, STDLIB, RuntimeBuildError, elf_files

# What the runtime must be able to import (the check, under chroot).
IMPORT_CHECK = "import recovery_agent.cli, recovery_agent.agent"


def run_in_tree(root: Path, *argv: str) -> str:
    """Run ``argv`` inside the tree with an empty environment: nothing of the host is seen."""
    chroot = tools.which("chroot")
    if chroot is None:
        raise tools.ToolMissing(tools.missing_message("chroot"))
    return tools.run(["env", "-i", chroot, str(root), *argv])


def check_linking(root: Path) -> None:
    """The tree's own loader resolves every ELF file of the tree, inside the tree."""
    loader = "/lib64/ld-linux-x86-64.so.2"
    problems = []
    for elf in elf_files(root):
        if elf == root / loader.lstrip("/"):
            continue
        rel = "/" + str(elf.relative_to(root))
        try:
            out = run_in_tree(root, loader, "--list", rel)
        except tools.ToolFailed as exc:  # the loader exits 127 when a library is missing
            problems.append(f"{rel}: {exc.stderr.strip()}")
            continue
        missing = [ln.strip() for ln in out.splitlines() if "not found" in ln]
        if missing:
            problems.append(f"{rel}: {', '.join(missing)}")
    if problems:
        raise RuntimeBuildError(
            "shared libraries missing from the runtime (add their "
            "packages to DEBIAN_LIBRARIES in recovery_lab/pyruntime/download.py): " + "; ".join(problems)
        )


def compile_tree(root: Path) -> int:
    """Compile every module with the tree's own interpreter (its magic number) as
    unchecked-hash pycs (valid without mtimes; reproducible). The stdlib and the wheels keep
    only the pyc, in place of the .py; the agent keeps its .py for tracebacks. Returns the
    number of source bytes dropped."""
    python = "/" + PYTHON
    # -B: the compiling interpreter must not leave caches of the modules it runs itself.
    common = [
        python,
        "-I",
        "-B",
        "-m",
        "compileall",
        "-q",
        "-j",
        "1",
        "--invalidation-mode",
        "unchecked-hash",
    ]
    # -b: legacy locations (foo.pyc beside foo.py), which import uses once foo.py is gone.
    run_in_tree(root, *common, "-b", "-x", "/recovery_agent/", "/" + STDLIB, "/" + SITE)
    run_in_tree(root, *common, "/" + SITE + "/recovery_agent")
    dropped = 0
    agent = root / SITE / "recovery_agent"
    for base in (root / STDLIB, root / SITE):
        for source in sorted(base.rglob("*.py")):
            if source.is_relative_to(agent) or source.is_symlink():
                continue
            if source.with_suffix(".pyc").is_file():
                dropped += source.stat().st_size
                source.unlink()
        # Debian's _sysconfigdata__linux_x86_64-linux-gnu.py is a symlink to the other name,
        # whose source is gone now; compileall compiled it through the link already.
        for link in sorted(base.rglob("*.py")):
            if link.is_symlink() and not link.exists():
                link.unlink()
    return dropped


def check_import(root: Path) -> tuple[float, list[str]]:
    """The tree's interpreter, isolated (-I) under chroot, imports the agent. Returns the
    seconds the import took and the modules it loaded."""
    code = (
        "import sys, time, json; sys.dont_write_bytecode = True; "
        "t = time.perf_counter(); " + IMPORT_CHECK + "; "
        "d = time.perf_counter() - t; "
        "bad = [p for p in sys.path if p and not p.startswith('/usr/lib/python3')]; "
        "print(json.dumps({'s': d, 'modules': sorted(sys.modules), 'path': sys.path, "
        "'prefix': sys.prefix, 'bad': bad}))"
    )
    try:
        out = run_in_tree(root, "/" + PYTHON, "-I", "-c", code)
    except tools.ToolFailed as exc:
        raise RuntimeBuildError(
            f"the runtime cannot import the agent under chroot (something needed was pruned?):\n{exc}"
        ) from exc
    result = json.loads(out.strip().splitlines()[-1])
    if result["prefix"] != "/usr" or result["bad"]:
        raise RuntimeBuildError(
            f"unexpected sys.prefix {result['prefix']} or sys.path {result['path']} in the runtime"
        )
    return result["s"], result["modules"]
