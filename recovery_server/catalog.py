"""The catalog of known fixes: from what an incident's reports say, propose a remediation.

A proposal is only a draft: a person still writes it into a remediation, and other people
approve it. Two fixes are known, each identifying files by content, never by name alone (the
bad and the fixed channel file 291 had the same name pattern):

- **a bad content file**: the crashing driver said which channel file it was loading;
  quarantine that path with the content (sha256) the devices reported for it;
- **a bad driver version**: the crash is in module M, the device runs version A of M, and
  its driver store holds another version B: restore B over the active file;
- **a driver that hangs the boot** (no crash record; the OS's boot progress log stops while
  loading module M) with no other version to roll back to: disable M, so the machine boots
  without it, degraded, as safe mode would.

Anything else (a crash in no module, init dying) has no known fix; the proposal says
so and a person writes the actions by hand, or nobody does and the devices are flagged for
manual recovery when their attempts run out.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from recovery_agent.protocol.admin import Candidate


class _File(Protocol):
    @property
    def path(self) -> str: ...
    @property
    def sha256(self) -> str: ...
    @property
    def version(self) -> str | None: ...


class _Report(Protocol):
    """What the catalog reads of a report: its file lists (a Diagnostics, or ReportFiles)."""

    @property
    def drivers(self) -> Sequence[_File]: ...
    @property
    def channel_files(self) -> Sequence[_File]: ...
    @property
    def driver_store(self) -> Sequence[_File]: ...


class Listed(NamedTuple):
    """A file record as the catalog reads it."""

    path: str
    sha256: str
    version: str | None


@dataclass(frozen=True)
class ReportFiles:
    """A stored report's file lists, read as plain JSON: the server validated the report when it
    stored it, and the model parse of every report of a fleet's incident costs seconds."""

    drivers: list[Listed]
    channel_files: list[Listed]
    driver_store: list[Listed]

    @classmethod
    def of_payload(cls, payload: str) -> ReportFiles:
        report = json.loads(payload)

        def files(name: str) -> list[Listed]:
            return [Listed(f["path"], f["sha256"], f.get("version")) for f in report.get(name, ())]

        return cls(files("drivers"), files("channel_files"), files("driver_store"))


@dataclass
class Proposal:
    title: str = ""
    actions: list[dict[str, Any]] = field(default_factory=list)
    why: list[str] = field(default_factory=list)


def _module_of(record: _File) -> str:
    return record.path.rsplit("/", 1)[-1].split(".ko")[0]


def propose(incident: dict[str, Any], reports: Iterable[_Report]) -> Proposal:
    """The draft fix; ``reports`` is read once, one at a time (a fleet's incident has
    100,000)."""
    p = Proposal()
    channel_file = incident.get("channel_file")
    module = incident.get("guilty_module")
    if channel_file:
        contents = sorted({f.sha256 for d in reports for f in d.channel_files if f.path == channel_file})
        for sha in contents:
            p.actions.append({"type": "quarantine_file", "path": channel_file, "sha256": sha})
        p.title = f"Quarantine {channel_file.rsplit('/', 1)[-1]}"
        p.why.append(
            f"{module or 'the driver'} crashed while loading {channel_file}; "
            f"{len(contents)} distinct content(s) reported for it"
        )
        return p
    if module:
        restores: dict[tuple[str, str, str], str] = {}
        for d in reports:
            active = [f for f in d.drivers if _module_of(f) == module]
            stored = [f for f in d.driver_store if _module_of(f) == module]
            for a in active:
                other = sorted(
                    (s for s in stored if s.version != a.version and s.sha256 != a.sha256),
                    key=lambda s: s.version or "",
                    reverse=True,
                )
                if other:
                    s = other[0]
                    restores[(a.path, s.path, s.sha256)] = f"{a.version or '?'} -> {s.version or '?'}"
        for (path, source, sha), change in sorted(restores.items()):
            p.actions.append({"type": "restore_file", "path": path, "source": source, "sha256": sha})
            p.why.append(
                f"{module} {change}: the crash is in {module}; the driver store holds another version"
            )
        if p.actions:
            p.title = f"Roll {module} back to the stored version"
            return p
        if incident.get("kind") == "hang":
            p.actions.append({"type": "disable_driver", "name": module})
            p.title = f"Disable {module}: it hangs the boot"
            p.why.append(f"the boot hangs while loading {module} and no other version is stored")
            return p
    p.why.append("no known fix for this crash: write the actions by hand")
    return p


def from_correlation(candidate: Candidate, crashing: int, healthy: int) -> Proposal:
    """A draft fix from the correlation's top candidate (correlation.py): quarantine that
    content, with its evidence."""
    name = candidate.path.rsplit("/", 1)[-1]
    onset = ""
    if candidate.onset_before_s is not None:
        onset = f"; the fleet first had it {candidate.onset_before_s:.0f} s before the first report"
    return Proposal(
        title=f"Quarantine {name} ({candidate.sha256[:12]})",
        actions=[{"type": "quarantine_file", "path": candidate.path, "sha256": candidate.sha256}],
        why=[
            "no known fix for this crash; the correlation of the fleet's files names this one "
            f"(recovery-admin incidents INC --why): on {candidate.crashing} of {crashing} "
            f"devices of the incident ({candidate.crashing_share:.0%}) against {candidate.healthy} "
            f"of {healthy} healthy devices ({candidate.healthy_share:.0%}), odds ratio "
            f"{candidate.odds_ratio:.3g}, p = {candidate.p_value:.2g} (one-sided Fisher exact test)"
            f"{onset}"
        ],
    )
