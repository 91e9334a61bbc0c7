"""The harness without QEMU: the console matcher, the event log, timelines and boot reports,
from recorded console text (real captures in tests/data/panic) and recorded QMP events."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from recovery_lab.boot import BootReport
from recovery_lab.qemu import (
    BootTimeout,
    Console,
    ConsoleLine,
    EventLog,
    MachineConfig,
    QemuEvent,
    QemuExited,
    build_command,
)
from recovery_lab.timeline import EntryKind, build_timeline, load_events, recorded_timeline

DATA = Path(__file__).parent / "data/panic"
CHANNEL_FILE = (DATA / "channel-file-console.txt").read_text()
PSTORE_PANIC = (DATA / "channel-file-pstore.txt").read_text()


def timed(text: str, start: float, step: float = 0.01) -> list[ConsoleLine]:
    return [ConsoleLine(start + i * step, ln) for i, ln in enumerate(text.splitlines())]


def ev(name: str, seconds: float, **data) -> QemuEvent:
    return QemuEvent(name, data, seconds)


# --------------------------------------------------------------------------- console


async def test_console_matches_a_line_split_across_chunks() -> None:
    console = Console()
    seen: list[str] = []
    console.on_line(seen.append)
    waiter = asyncio.create_task(console.wait_for(r"QMR-SPLIT-AB-END", timeout=5))
    await asyncio.sleep(0)
    for chunk in (b"boot\r\nQMR-SP", b"LIT-A", b"B-E", b"ND\r\n"):
        console.feed(chunk)
        await asyncio.sleep(0)
    m = await waiter
    assert m.group(0) == "QMR-SPLIT-AB-END"
    assert seen == ["boot", "QMR-SPLIT-AB-END"]  # hooks see whole lines, CRs stripped


async def test_console_matches_a_partial_line_and_a_split_utf8_character() -> None:
    console = Console()
    snowman = "☃".encode()
    console.feed(b"prompt " + snowman[:1])
    console.feed(snowman[1:] + b" login:")
    m = await console.wait_for(r"☃ login:", timeout=1)  # no newline yet
    assert m.end() == len("prompt ☃ login:")
    assert console.lines() == []
    assert console.tail() == ["prompt ☃ login:"]


async def test_console_cursor_walks_forward_and_since_rewinds() -> None:
    console = Console()
    console.feed(b"mark 1\nmark 2\n")
    assert (await console.wait_for(r"mark \d", 1)).group(0) == "mark 1"
    assert (await console.wait_for(r"mark \d", 1)).group(0) == "mark 2"
    assert (await console.wait_for(r"mark \d", 1, since=0)).group(0) == "mark 1"


async def test_console_timeout_names_what_was_awaited_and_shows_the_tail() -> None:
    console = Console()
    console.feed(b"Kernel panic - not syncing: Fatal exception\n")
    with pytest.raises(BootTimeout) as info:
        await console.wait_for(r"QMR-HEALTHY", timeout=0.05)
    assert "QMR-HEALTHY" in str(info.value)
    assert "Kernel panic" in str(info.value)


async def test_console_close_fails_pending_waits() -> None:
    console = Console()
    waiter = asyncio.create_task(console.wait_for(r"never", timeout=5))
    await asyncio.sleep(0)
    console.feed(b"last words")
    console.close(QemuExited("x", 0, []))
    with pytest.raises(QemuExited):
        await waiter
    assert console.lines() == ["last words"]  # the partial line is flushed at close


# --------------------------------------------------------------------------- events


async def test_event_log_waits_with_cursor_and_predicate(tmp_path: Path) -> None:
    log = EventLog(t0=0.0, jsonl=tmp_path / "events.jsonl")
    log.record({"event": "RESUME", "data": {}}, now=0.1)
    waiter = asyncio.create_task(log.wait("SHUTDOWN", 5, predicate=lambda e: e.data["guest"]))
    await asyncio.sleep(0)
    log.record({"event": "SHUTDOWN", "data": {"guest": False, "reason": "host-qmp-quit"}}, now=1)
    await asyncio.sleep(0)
    assert not waiter.done()
    log.record(
        {
            "event": "SHUTDOWN",
            "data": {"guest": True, "reason": "guest-shutdown"},
            "timestamp": {"seconds": 10, "microseconds": 500000},
        },
        now=2,
    )
    got = await waiter
    assert got.data["reason"] == "guest-shutdown" and got.qemu_time == 10.5
    with pytest.raises(BootTimeout, match="QMP event RESET"):
        await log.wait("RESET", 0.05)
    assert [e.name for e in load_events(tmp_path / "events.jsonl")] == ["RESUME", "SHUTDOWN", "SHUTDOWN"]


def test_command_line_has_the_chosen_flags(tmp_path: Path) -> None:
    cfg = MachineConfig(kernel=tmp_path / "vmlinuz", forward_port=8080)
    cmd = build_command(cfg, qmp_fd=7, console_path=tmp_path / "console.log", disk_path=None, drive_paths=[])
    joined = " ".join(cmd)
    assert "-S" in cmd and "-accel tcg" in joined and "-m 512" in joined
    assert "socket,id=qmp,fd=7" in joined and "-mon chardev=qmp,mode=control" in joined
    assert "-action reboot=reset,shutdown=poweroff,panic=none,watchdog=reset" in joined
    assert "-device pvpanic" in joined and "-device i6300esb" in joined
    assert "guestfwd=tcp:10.0.2.100:8080-cmd:" in joined and "restrict=on" in joined
    assert "-no-reboot" not in cmd and "-no-shutdown" not in cmd


# --------------------------------------------------------------------------- timelines


def channel_file_run() -> tuple[list[ConsoleLine], list[QemuEvent]]:
    """Two failed OS boots, then the recovery environment dumps pstore and powers off."""
    lines: list[ConsoleLine] = []
    lines += timed("QMR-GRUB entry=os boot_count=1\n" + CHANNEL_FILE, start=3.0)
    lines += timed("QMR-GRUB entry=os boot_count=2\n" + CHANNEL_FILE, start=17.0)
    recovery = (
        "QMR-GRUB entry=recovery boot_count=2\n"
        "[    0.000000] Linux version 6.1.0-56-amd64 (debian-kernel@lists.debian.org)\n"
        "QMR-RECOVERY-BEGIN\nQMR-PSTORE dmesg-ramoops-1\n"
        + PSTORE_PANIC
        + "\nQMR-RECOVERY boot_count=2\nQMR-RECOVERY-END\n"
    )
    lines += timed(recovery, start=31.0, step=0.001)
    events = [ev("RESUME", 0.02), ev("GUEST_PANICKED", 9.3, action="run")]
    events += [ev("RESET", 14.29 + i * 0.01, guest=True, reason="guest-reset") for i in range(5)]
    events += [ev("GUEST_PANICKED", 22.8, action="run")]
    events += [ev("RESET", 28.0 + i * 0.01, guest=True, reason="guest-reset") for i in range(3)]
    events += [ev("SHUTDOWN", 38.1, guest=True, reason="guest-shutdown")]
    return lines, events


def test_timeline_of_the_channel_file_loop() -> None:
    lines, events = channel_file_run()
    t = build_timeline(lines, events)
    assert t.kinds() == [
        "boot",
        "grub_entry",
        "panic",
        "guest_panicked",
        "reset",
        "boot",
        "grub_entry",
        "panic",
        "guest_panicked",
        "reset",
        "boot",
        "grub_entry",
        "recovery_begin",
        "pstore",
        "recovery_end",
        "shutdown",
    ]
    panics = t.of_kind(EntryKind.PANIC)
    assert [p.data["title"] for p in panics] == ["general protection fault in sensor_parse_channel"] * 2
    assert panics[0].data["guilty_module"] == "sensor" and panics[0].boot == 1
    assert panics[0].data["channel_file"].endswith("C-00000291-00000000-00000032.sys")
    resets = t.of_kind(EntryKind.RESET)
    assert [r.data["events"] for r in resets] == [5, 3] and [r.boot for r in resets] == [1, 2]
    pstore = t.of_kind(EntryKind.PSTORE)[0]
    assert pstore.data["crash"] == "general protection fault in sensor_parse_channel"
    json.dumps(t.to_json())  # serialisable
    assert "entry=recovery boot_count=2" in t.render()

    report = BootReport.from_timeline(t, outcome="powered-off", seconds=38.2, exit_status=0, run_dir=None)
    assert (report.boots, report.resets, report.guest_panicked) == (3, 2, 2)
    assert report.entries_chosen == ["os", "os", "recovery"]
    assert report.reached_recovery and not report.healthy
    assert report.pstore_records == ["dmesg-ramoops-1"]
    assert report.shutdown_reason == "guest-shutdown"
    assert "os -> os -> recovery" in report.render()


def test_boots_without_grub_markers_start_at_the_kernel_banner() -> None:
    lines = timed(CHANNEL_FILE, 1.0) + timed(CHANNEL_FILE, 10.0)
    t = build_timeline(
        lines,
        [
            ev("RESET", 8.0, guest=True, reason="guest-reset"),
            ev("WATCHDOG", 20.0, action="reset"),
            ev("RESET", 20.0, guest=True, reason="guest-reset"),
        ],
    )
    assert t.kinds() == ["boot", "panic", "reset", "boot", "panic", "watchdog", "reset"]
    assert t.of_kind(EntryKind.BOOT)[1].detail == "boot 2 started (Linux 6.1.0-56-amd64)"


def test_hang_and_healthy_markers() -> None:
    hang = (DATA / "sensor-hang-console.txt").read_text()
    t = build_timeline(
        timed("QMR-GRUB entry=os boot_count=1\n" + hang, 1.0)
        + timed("QMR-GRUB entry=os boot_count=1\nQMR-HEALTHY boot_count=0", 40.0),
        [ev("WATCHDOG", 30.0, action="reset")],
    )
    kinds = [(e.kind.value, e.data.get("kind")) for e in t.entries if e.kind is EntryKind.PANIC]
    assert kinds == [("panic", "hang")]
    healthy = t.of_kind(EntryKind.HEALTHY)
    assert healthy[0].boot == 2 and healthy[0].data == {"boot_count": "0"}
    assert not BootReport.from_timeline(
        t, outcome="powered-off", seconds=1, exit_status=0, run_dir=None
    ).reached_recovery


def test_recorded_timeline_places_boots_after_their_resets() -> None:
    lines, events = channel_file_run()
    text = "\r\n".join(ln.text for ln in lines) + "\r\n"
    t = recorded_timeline(text, events)
    boots = t.of_kind(EntryKind.BOOT)
    resets = t.of_kind(EntryKind.RESET)
    assert boots[0].seconds == 0 and resets[0].seconds < boots[1].seconds < resets[0].seconds + 1
    assert t.kinds()[:6] == ["boot", "grub_entry", "panic", "guest_panicked", "reset", "boot"]


def test_agent_lines_exit_and_health_report_are_entries():
    text = (
        "\n".join(
            [
                "QMR-GRUB entry=recovery boot_count=2",
                "QMR-RECOVERY-BEGIN",
                "QMR-RECOVERY boot_count=2",
                "QMR-RECOVERY-AGENT start",
                "[agent +   0.41s] detect    kernel_panic: general protection fault in sensor_parse_channel",
                "[agent +   1.02s] apply     action 0 quarantine_file: applied",
                "QMR-AGENT exit=0",
                "QMR-RECOVERY-END",
                "QMR-GRUB entry=os boot_count=1",
                "QMR-HEALTHY boot_count=0",
                "QMR-HEALTH-REPORTED",
            ]
        )
        + "\n"
    )
    tl = recorded_timeline(text, [])
    agent = tl.of_kind(EntryKind.AGENT)
    assert [e.data["phase"] for e in agent] == ["detect", "apply"]
    assert tl.of_kind(EntryKind.AGENT_EXIT)[0].data["code"] == 0
    assert tl.of_kind(EntryKind.HEALTH_REPORT)[0].data["ok"] is True
    assert tl.of_kind(EntryKind.PANIC) == [], "the agent naming a crash is not a crash"
