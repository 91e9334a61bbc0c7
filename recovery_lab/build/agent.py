"""The agent in a root filesystem: the Python runtime tree, the launcher, udhcpc's script.

The OS root and the recovery environment both run ``recovery-agent``: each gets the runtime
(Debian's python3.11, the agent's wheels and ``recovery_agent``, built by
:mod:`recovery_lab.pyruntime`) merged into it, plus the files in :data:`AGENT_FILES`. A stage
that holds the agent adds :func:`agent_inputs` to its cache key, so a change to the agent or
its runtime rebuilds it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..checkout import IMAGES
from ..pyruntime import RuntimeArtifact
from .cache import Inputs, files_hash
from .files import write_file

# What the OS and the recovery environment need to run the agent, besides the runtime tree:
# the launcher (/usr/bin/recovery-agent) and udhcpc's event script.
AGENT_FILES = {
    "usr/bin/recovery-agent": (IMAGES / "recovery" / "recovery-agent", 0o755),
    "usr/share/udhcpc/default.script": (IMAGES / "os" / "udhcpc.script", 0o755),
}


def install_agent(root: Path, runtime: RuntimeArtifact) -> None:
    """Merge the Python runtime tree (``usr/bin/python3.11``, ``usr/lib/python3.11``,
    ``lib/x86_64-linux-gnu``, ``lib64/ld-linux-x86-64.so.2``) into ``root``, with the
    ``recovery-agent`` launcher and udhcpc's script (:data:`AGENT_FILES`)."""
    src = Path(runtime.root)
    for path in sorted(src.rglob("*")):
        dest = root / path.relative_to(src)
        if path.is_symlink():
            if dest.is_symlink() or dest.exists():
                dest.unlink()
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(os.readlink(path))
        elif path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
        else:
            write_file(dest, path.read_bytes(), path.stat().st_mode & 0o7777)
    for rel, (recipe, mode) in AGENT_FILES.items():
        write_file(root / rel, recipe.read_bytes(), mode)


def agent_inputs(runtime: RuntimeArtifact) -> Inputs:
    """Cache-key inputs for a stage that holds the agent: the runtime's key (which covers
    its packages, wheels and the agent's sources) and the launcher and udhcpc script."""
    return {
        "pyruntime": runtime.key,
        "agent_files": files_hash(recipe for recipe, _ in AGENT_FILES.values()),
    }
