"""What a run of the whole loop showed (``RunReport``), as JSON and as text for a person.

``recovery_lab.loop`` fills it in from the VM's timeline, the server's records and the disk the
run left; the report lists the phases with their times, and every way the run missed what it
should show (``problems``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .boot import BootReport


@dataclass
class Phase:
    """One phase of the loop (failed boots, diagnostics, approval, ...) in run seconds."""

    name: str
    start: float
    end: float

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "start": round(self.start, 2), "duration": round(self.end - self.start, 2)}


@dataclass
class RunReport:
    """What a run of the loop showed, and every way it missed what it should show
    (``problems``: empty when the machine recovered, or, with a fault, when it ended the way
    the fault predicts)."""

    scenario: str
    recovered: bool
    boots: int
    phases: list[Phase]
    time_to_recovery_s: float | None
    server_incident: dict[str, Any] | None
    outcome: str
    device: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    disk: dict[str, Any] = field(default_factory=dict)
    boot: BootReport | None = None
    workdir: str = ""
    faults: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # With --recovery-test: the test's records, the server's pass, what changed on the OS.
    recovery_test: dict[str, Any] | None = None

    @property
    def met_expectations(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "recovered": self.recovered,
            "boots": self.boots,
            "phases": [p.to_json() for p in self.phases],
            "time_to_recovery_s": None
            if self.time_to_recovery_s is None
            else round(self.time_to_recovery_s, 2),
            "server_incident": self.server_incident,
            "outcome": self.outcome,
            "device": self.device,
            "disk": self.disk,
            "server_events": self.events,
            "vm": self.boot.to_json() if self.boot else None,
            "workdir": self.workdir,
            "faults": self.faults,
            "problems": self.problems,
            "recovery_test": self.recovery_test,
        }


def render(report: RunReport) -> str:
    lines = [
        "",
        f"Scenario {report.scenario}: {'RECOVERED' if report.recovered else 'not recovered'} "
        f"({report.outcome}, {report.boots} boots)"
        + (f", faults {', '.join(report.faults)}" if report.faults else ""),
    ]
    for p in report.phases:
        lines.append(f"  {p.name:<40} at {p.start:7.1f}s  took {p.end - p.start:6.1f}s")
    if report.time_to_recovery_s is not None:
        lines.append(f"  time to recovery: {report.time_to_recovery_s:.1f}s")
    if report.server_incident:
        i = report.server_incident
        lines.append(
            f"  incident {i['incident_id']}: {i['title']} (module {i['guilty_module']}, "
            f"file {i['channel_file']}); results: {[r['outcome'] for r in i['results']]}"
        )
        if i.get("correlation") and i["correlation"]["candidates"]:
            c, corr = i["correlation"]["candidates"][0], i["correlation"]
            lines.append(
                f"  fleet: {i['fleet']['devices']} simulated devices; the files' correlation names "
                f"{c['path']} ({c['sha256'][:12]}): on {c['crashing']}/{corr['crashing_devices']} "
                f"of the incident's devices, {c['healthy']}/{corr['healthy_devices']} healthy, "
                f"p = {c['p_value']:.2g}"
            )
    if report.device:
        lines.append(f"  device {report.device.get('device_id')}: {report.device.get('state')}")
    if report.recovery_test is not None:
        t = report.recovery_test
        lines.append(
            f"  recovery test: {'PASSED at ' + t['passed_at'] if t['passed_at'] else 'not passed'}; GRUB "
            f"{' -> '.join(t['grub_entries'])}; OS changed outside the agent's state: "
            f"{t.get('os_changed', '?') or 'nothing'}"
        )
    if report.disk:
        lines.append(
            f"  disk: boot_count={report.disk['grubenv'].get('boot_count')}, channel files "
            f"{report.disk['channel_files']}, quarantine {report.disk['quarantine']}"
        )
    for problem in report.problems:
        lines.append(f"  MISSED: {problem}")
    if report.faults and report.met_expectations:
        lines.append(f"  the run showed what {', '.join(report.faults)} predict(s)")
    lines.append(f"  everything is in {report.workdir}")
    return "\n".join(lines)
