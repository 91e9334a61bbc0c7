"""``recovery-lab boot``: boot one machine and report what happened, the layer between a
scenario and QEMU.

``boot_scenario(image)`` boots a disk image (through its own GRUB) in a :class:`QemuVM`,
follows it through every in-VM reboot (panic, watchdog, the recovery entry) until the guest
powers off, a stop marker appears, or the time is up, then builds the :class:`Timeline` from
the console and the QMP events and counts what matters in a :class:`BootReport`: boots,
panics with their titles, resets, watchdog fires, the GRUB entries chosen, whether the
recovery environment ran, whether the OS said it was healthy.

A timeout is an outcome, not an exception: the report's outcome is ``timed-out`` and the run
directory is kept (console.log, qemu.stderr, events.jsonl, cmdline.txt, timeline.json,
report.json) for a person to read. Errors that stop the run from happening at all
(:class:`~recovery_lab.qemu.QemuMissing`, :class:`~recovery_lab.qemu.QemuFailedToStart`,
:class:`~recovery_lab.qemu.MachineConfigError` for a missing image) are raised.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .qemu import BootTimeout, ConsoleLine, MachineConfig, MachineConfigError, QemuExited, QemuVM
from .timeline import EntryKind, Timeline, build_timeline

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
# After a stop marker, let the guest write a little more before QEMU is stopped.
LINGER_S = 1.0
# With ``power_down``: how long a guest gets to shut down cleanly after the stop marker.
POWERDOWN_TIMEOUT_S = 120.0


@dataclass
class BootReport:
    """What one run of a machine did, judged from QMP events and console markers."""

    timeline: Timeline
    outcome: str  # "powered-off", "stop-marker", "timed-out", "qemu-exited"
    seconds: float
    exit_status: int | None
    run_dir: Path | None  # kept run directory, if any
    boots: int = 0
    panics: list[str] = field(default_factory=list)
    resets: int = 0
    watchdog_fires: int = 0
    guest_panicked: int = 0
    entries_chosen: list[str] = field(default_factory=list)
    reached_recovery: bool = False
    healthy: bool = False
    pstore_records: list[str] = field(default_factory=list)
    shutdown_reason: str | None = None
    console_text: str = ""
    # Every console line with the host seconds it was read at (not in the JSON: the timeline
    # holds what matters; benchmarks time lines that are no timeline entry, e.g. the kernel's).
    console_lines: list[ConsoleLine] = field(default_factory=list)

    @classmethod
    def from_timeline(cls, timeline: Timeline, **kw: Any) -> BootReport:
        shutdowns = timeline.of_kind(EntryKind.SHUTDOWN)
        grub = timeline.of_kind(EntryKind.GRUB_ENTRY)
        return cls(
            timeline=timeline,
            boots=timeline.count(EntryKind.BOOT),
            panics=[str(e.data.get("title")) for e in timeline.of_kind(EntryKind.PANIC)],
            resets=timeline.count(EntryKind.RESET),
            watchdog_fires=timeline.count(EntryKind.WATCHDOG),
            guest_panicked=timeline.count(EntryKind.GUEST_PANICKED),
            entries_chosen=[str(e.data.get("entry", "?")) for e in grub],
            reached_recovery=bool(timeline.of_kind(EntryKind.RECOVERY_BEGIN))
            or any(e.data.get("entry") == "recovery" for e in grub),
            healthy=bool(timeline.of_kind(EntryKind.HEALTHY)),
            pstore_records=[str(e.data.get("record")) for e in timeline.of_kind(EntryKind.PSTORE)],
            shutdown_reason=str(shutdowns[-1].data.get("reason")) if shutdowns else None,
            **kw,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "seconds": round(self.seconds, 2),
            "exit_status": self.exit_status,
            "run_dir": str(self.run_dir) if self.run_dir else None,
            "boots": self.boots,
            "panics": self.panics,
            "resets": self.resets,
            "watchdog_fires": self.watchdog_fires,
            "guest_panicked": self.guest_panicked,
            "entries_chosen": self.entries_chosen,
            "reached_recovery": self.reached_recovery,
            "healthy": self.healthy,
            "pstore_records": self.pstore_records,
            "shutdown_reason": self.shutdown_reason,
            "timeline": self.timeline.to_json(),
        }

    def render(self) -> str:
        lines = [
            self.timeline.render(),
            "",
            f"outcome: {self.outcome} after {self.seconds:.1f} s (QEMU exit status {self.exit_status})",
            f"boots: {self.boots}, resets: {self.resets}, "
            f"watchdog fires: {self.watchdog_fires}, pvpanic: {self.guest_panicked}",
            f"GRUB entries: {' -> '.join(self.entries_chosen) or '(no GRUB markers)'}",
            f"panics: {'; '.join(self.panics) or 'none'}",
            f"reached recovery: {'yes' if self.reached_recovery else 'no'}, "
            f"healthy: {'yes' if self.healthy else 'no'}",
        ]
        if self.pstore_records:
            lines.append(f"pstore records seen in recovery: {', '.join(self.pstore_records)}")
        if self.run_dir:
            lines.append(f"logs kept in {self.run_dir}")
        return "\n".join(lines)


async def follow_boot(
    config: MachineConfig,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    keep_logs: bool = False,
    run_dir: Path | None = None,
    stop_on: str | None = None,
    name: str = "qmr",
    on_line: Callable[[float, str], None] | None = None,
    drive: Callable[[QemuVM], Coroutine[Any, Any, None]] | None = None,
    power_down: bool = False,
) -> BootReport:
    """Run ``config`` until the guest powers off, ``stop_on`` (a regex) appears on the
    console, or ``timeout`` seconds pass; return the report. With ``power_down``, a guest that
    showed ``stop_on`` is asked to shut down (the ACPI power button) and given
    ``POWERDOWN_TIMEOUT_S`` to do it before QEMU is stopped: its filesystems are then clean
    for the lab to read (a root cut off mid-write may hold its latest changes only in its
    journal, which debugfs does not replay). The run directory is kept if
    ``keep_logs`` or the run timed out. ``on_line(seconds, line)`` sees every console line as
    it arrives (for live progress). ``drive(vm)`` runs beside the machine (a fault acting on
    it through QMP) and is cancelled when the run ends; its errors are its own to report."""
    vm = QemuVM(config, run_dir=run_dir, keep=keep_logs, name=name)
    if on_line is not None:
        vm.console.on_line(lambda line: on_line(vm.seconds(), line))
    outcome = "powered-off"
    try:
        await vm.start()
    except BaseException:
        vm.finish(failed=True)
        raise
    driver: asyncio.Task[None] | None = asyncio.create_task(drive(vm)) if drive is not None else None
    try:
        waits: list[asyncio.Task[Any]] = [asyncio.create_task(vm.wait_exit(timeout))]
        if stop_on is not None:
            waits.append(asyncio.create_task(vm.console.wait_for(re.compile(stop_on), timeout)))
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        first = done.pop()
        exc = first.exception()
        if isinstance(exc, BootTimeout):
            outcome = "timed-out"
        elif isinstance(exc, QemuExited):
            outcome = "qemu-exited"
        elif exc is not None:
            raise exc
        elif first is not waits[0]:
            outcome = "stop-marker"
            await asyncio.sleep(LINGER_S)
            if power_down:
                await _shut_down(vm)
        elif vm.returncode != 0:
            outcome = "qemu-exited"
    finally:
        if driver is not None:
            driver.cancel()
            for err in await asyncio.gather(driver, return_exceptions=True):
                if isinstance(err, Exception):
                    log.warning("the run's driver failed: %s", err)
        await vm.stop()
    lines = vm.console.timed_lines()
    timeline = build_timeline(lines, vm.events.events)
    failed = outcome in ("timed-out", "qemu-exited")
    kept = keep_logs or failed
    report = BootReport.from_timeline(
        timeline,
        outcome=outcome,
        seconds=vm.seconds(),
        exit_status=vm.returncode,
        run_dir=vm.run_dir if kept else None,
        console_text=vm.console.text(),
        console_lines=list(lines),
    )
    if kept:
        (vm.run_dir / "timeline.json").write_text(json.dumps(timeline.to_json(), indent=1))
        (vm.run_dir / "report.json").write_text(json.dumps(report.to_json(), indent=1))
    vm.finish(failed=failed)
    return report


async def _shut_down(vm: QemuVM) -> None:
    """Press the guest's power button and wait, bounded, for it to power off; a guest that
    does not is stopped as before by the caller."""
    try:
        await vm.execute("system_powerdown")
        await vm.wait_exit(POWERDOWN_TIMEOUT_S)
    except Exception as exc:  # (a guest that ignores the button, QEMU gone already)
        log.warning("the guest did not shut down cleanly after the stop marker: %s", exc)


def boot_scenario(
    image_path: Path,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    keep_logs: bool = False,
    run_dir: Path | None = None,
    stop_on: str | None = None,
    accel: str = "tcg",
    memory_mb: int = 512,
) -> BootReport:
    """Boot the disk image ``image_path`` (never written: the run uses an overlay), follow it
    through its reboots and report. Synchronous; see :func:`follow_boot`."""
    image = Path(image_path)
    if not image.is_file():
        raise MachineConfigError(f"disk image {image} does not exist: build it with recovery-lab build")
    fmt = "qcow2" if image.suffix == ".qcow2" else "raw"
    config = MachineConfig(disk=image, disk_format=fmt, accel=accel, memory_mb=memory_mb)
    return asyncio.run(
        follow_boot(
            config, timeout=timeout, keep_logs=keep_logs, run_dir=run_dir, stop_on=stop_on, name=image.stem
        )
    )
