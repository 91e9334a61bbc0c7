"""The import rules between the packages, checked by machine (docs/architecture.md):

- ``recovery_agent.protocol`` imports nothing else of the project: it is the bottom layer.
- the rest of ``recovery_agent`` builds on the protocol and never imports the server or the lab
  (it runs alone in the recovery environment);
- ``recovery_server`` imports only ``recovery_agent.protocol`` of the agent's side (the crash
  signature rules live there, ``protocol.crashreport``: both sides must make the same signature
  of the same report, so the rules are part of the contract, not of the agent alone);
- ``recovery_lab`` imports the protocol, the agent modules that read a machine the agent's way
  (named in ``LAB_MAY_IMPORT``) and the server (it runs one in process for a lab run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("recovery_agent", "recovery_server", "recovery_lab")
# The crash-signature rules are a function from a report's text to its signature, with no I/O:
# agents apply them to the logs they read, and the server applies the same rules to a report's
# excerpt when the agent that sent it ran another version of them (docs/crash-signatures.md).
# They stay beside the agent's evidence reading (detect.py), which is where they are developed
# and tested, rather than moving into the wire protocol, which they are not.
LAB_MAY_IMPORT = {
    "recovery_agent.bootenv",  # grubenv, as GRUB and the agent read it
    "recovery_agent.detect",  # the crash parser, to name panics in a run's console
    "recovery_agent.layout",  # where things are on the OS root
    "recovery_agent.digest",  # the one file-hash helper
    "recovery_agent.holds",  # the steps of an apply the lab can cut the power at
    "recovery_agent.install.wheel",  # wheels unpacked as the install does, for the recovery env
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every project import in ``path``."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # "from pkg import mod" imports the module pkg.mod when there is one
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                if (REPO / (candidate.replace(".", "/") + ".py")).exists() or (
                    REPO / candidate.replace(".", "/")
                ).is_dir():
                    out.append((node.lineno, candidate))
                else:
                    out.append((node.lineno, target))
    return [(line, name) for line, name in out if name.split(".")[0] in PACKAGES]


def _allowed(importer: str, imported: str) -> bool:
    def within(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    if within(imported, importer.split(".")[0]) and not within(imported, "recovery_agent"):
        return True  # inside the server or the lab
    if within(importer, "recovery_agent.protocol"):
        return within(imported, "recovery_agent.protocol")
    if within(importer, "recovery_agent"):
        return within(imported, "recovery_agent")
    if within(imported, "recovery_agent.protocol") or imported == "recovery_agent":
        return True
    if within(importer, "recovery_server"):
        return False
    if within(importer, "recovery_lab"):
        return within(imported, "recovery_server") or any(within(imported, m) for m in LAB_MAY_IMPORT)
    return False


SOURCES = sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_follow_the_layering(path: Path) -> None:
    importer = _module_name(path)
    bad = [f"line {line}: {name}" for line, name in _imports(path) if not _allowed(importer, name)]
    assert not bad, f"{importer} may not import: {', '.join(bad)} (see docs/architecture.md)"


def test_the_rule_check_catches_a_violation() -> None:
    assert not _allowed("recovery_server.service", "recovery_agent.remediate")
    assert not _allowed("recovery_agent.protocol.wire", "recovery_agent.bootenv")
    assert not _allowed("recovery_agent.agent", "recovery_server.service")
    assert not _allowed("recovery_lab.loop", "recovery_agent.remediate")
    assert _allowed("recovery_lab.loop", "recovery_agent.bootenv")
    assert _allowed("recovery_server.app", "recovery_agent.protocol.wire")
    assert _allowed("recovery_server.incidents", "recovery_agent.protocol.crashreport")
    assert not _allowed("recovery_server.incidents", "recovery_agent.detect")
