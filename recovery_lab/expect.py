"""Judge a boot against its scenario's ``[expect]`` block.

A scenario says how its machine must fail (or not): where it ends (the healthy OS or the
recovery environment), how many kernel panics and watchdog resets come before, which module
and function the panic names, the panic reason, and console lines that must appear. The
verdict is built from structured signals first (QMP events, the timeline's parsed panics,
GRUB's markers) and console text only for the lines the scenario names.
"""

from __future__ import annotations

from .boot import BootReport
from .scenario import Expect
from .timeline import EntryKind


def problems(report: BootReport, expect: Expect) -> list[str]:
    """Every way ``report`` differs from ``expect``; empty when the run did what it should."""
    out: list[str] = []
    if report.outcome != "powered-off":
        out.append(f"the run ended by {report.outcome}, not by the guest powering off")
    if expect.ends_in == "recovery":
        if not report.reached_recovery:
            out.append("the recovery environment never started")
        elif report.entries_chosen[-1:] != ["recovery"]:
            out.append(f"GRUB's last choice was {report.entries_chosen[-1:] or 'nothing'}, not recovery")
    else:
        if not report.healthy:
            out.append("the OS never reported QMR-HEALTHY")
        if report.reached_recovery:
            out.append("the recovery environment started, but the scenario should stay healthy")
    panics = report.timeline.of_kind(EntryKind.PANIC)
    if len(panics) != expect.panics:
        out.append(f"{len(panics)} kernel panics, expected {expect.panics}: {report.panics}")
    if report.watchdog_fires != expect.resets:
        out.append(f"{report.watchdog_fires} watchdog resets, expected {expect.resets}")
    for p in panics:
        if expect.panic_module and p.data.get("guilty_module") != expect.panic_module:
            out.append(
                f"panic at {p.seconds:.1f}s blames module {p.data.get('guilty_module')!r}, "
                f"expected {expect.panic_module!r}"
            )
        if expect.panic_function and p.data.get("guilty_frame") != expect.panic_function:
            out.append(
                f"panic at {p.seconds:.1f}s blames {p.data.get('guilty_frame')!r}, "
                f"expected {expect.panic_function!r}"
            )
    text = report.console_text
    if expect.panic_reason and f"Kernel panic - not syncing: {expect.panic_reason}" not in text:
        out.append(f"no 'Kernel panic - not syncing: {expect.panic_reason}' on the console")
    for line in expect.console:
        if line not in text:
            out.append(f"console never showed {line!r}")
    return out
