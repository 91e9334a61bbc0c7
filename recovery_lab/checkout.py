"""Where the lab finds what it is made from: the repository checkout it runs from.

The lab runs from a clone of the repository (``scripts/setup.sh`` installs it editable) and
reads its recipes there: ``images/`` (what the machines are built from, the scenarios, the
crash records the no-VM demo uses) and ``recovery_agent/`` (the agent that goes into the
images). Nothing here reads a file.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "images"
EVIDENCE = IMAGES / "evidence"
AGENT_PACKAGE = REPO / "recovery_agent"
