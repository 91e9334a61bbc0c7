"""The agent never dies on its evidence: whatever pstore, the logs, grubenv and the OS tree
hold, `run` reports within the stated caps (docs/recovery-loop.md, "The limits of a report"),
says what it cut, and exits with one of its documented codes. These tests check the caps,
never a timing."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from recovery_agent import detect as detect_module
from recovery_agent import inventory
from recovery_agent.agent import Outcome, RecoveryAgent
from recovery_agent.bootenv import BootEnv
from recovery_agent.counting import HISTORY_LIMIT
from recovery_agent.detect import (
    BOOT_LOG_LIMIT,
    LINE_LIMIT,
    PSTORE_RECORD_LIMIT,
    PSTORE_TOTAL_LIMIT,
    examine,
    read_pstore,
)
from recovery_agent.inventory import FILES_PER_KIND, WALK_DEPTH_LIMIT, collect_channel_files, collect_drivers
from recovery_agent.layout import CHANNEL_DIR as CHANNELS
from recovery_agent.protocol.envelope import MAX_ENVELOPE_BYTES, canonical_json
from recovery_agent.protocol.keys import SigningKey
from recovery_agent.protocol.wire import (
    COUNTER_MAX,
    BootState,
    CrashKind,
    CrashSignature,
    Diagnostics,
    FileRecord,
    SystemInfo,
    utcnow,
)
from recovery_agent.report import Findings, fit_signature, seal_within

from .conftest import enrolled_settings

DATA = Path(__file__).parent / "data/panic"
PANIC = (DATA / "channel-file-pstore.txt").read_text()
BAD_CHANNEL = "/var/lib/sensor/channels/C-00000291-00000000-00000032.sys"
SHA = "c" * 64


def grub(machine: Path) -> BootEnv:
    return BootEnv.read(machine / "esp/grub/grubenv")


def set_grub(machine: Path, **values: object) -> None:
    env = grub(machine)
    for name, value in values.items():
        env.set(name, str(value))
    env.write(machine / "esp/grub/grubenv")


async def run_once(fleet, machine: Path, clock, **overrides) -> tuple[Outcome, list[Diagnostics]]:
    """One agent run that asks the server once (no fix will come) and the diagnostics the
    server stored for it."""
    settings = await enrolled_settings(fleet, machine, auto_remediation=False, long_poll_s=0.1, **overrides)
    await clock.release()
    outcome = await RecoveryAgent(settings, clock=clock).run()
    reports = [
        r.diagnostics
        for i in fleet.service.incidents(fleet.viewer)
        for r in fleet.service.incident(fleet.viewer, i.incident_id).reports
    ]
    return outcome, reports


# --------------------------------------------------------------------------- crash texts


@pytest.mark.parametrize(
    "change",
    [
        ("sensor_parse_channel", "s" * 300),  # a 300-character symbol (kernels allow 511)
        ("[sensor]", "[" + "m" * 70 + "]"),  # a module name over 64 characters
        (BAD_CHANNEL, "/var/lib/sensor/" + "c/" * 520 + "C-1.sys"),  # a path over 1024 characters
    ],
    ids=["long-symbol", "long-module", "long-channel-path"],
)
async def test_a_crash_text_over_the_wire_limits_is_reported(fleet, machine, clock, change) -> None:
    (machine / "pstore/dmesg-ramoops-0").write_text(PANIC.replace(*change))
    outcome, [diagnostics] = await run_once(fleet, machine, clock)
    assert outcome is Outcome.NO_REMEDIATION
    assert grub(machine).get("recovery_attempts") == "1"
    assert [d.recovery_attempts for d in fleet.service.devices(fleet.viewer)] == [1]
    crash = diagnostics.crash
    assert crash.channel_file is None or len(crash.channel_file) <= 1024
    assert crash.guilty_frame is None or len(crash.guilty_frame) <= 256


def test_whatever_the_parser_returns_is_fitted_to_the_wire() -> None:
    class Parsed:  # what a parser bug could hand back
        kind = "exploded"
        title = "t" * 5000
        guilty_frame = "f" * 511
        guilty_module = "m" * 100
        channel_file = "c/" * 600
        source = "pstore:\udcff" * 100
        excerpt = "\x00" * 100_000

    sig, notes = fit_signature(Parsed())
    assert sig.kind is CrashKind.UNKNOWN
    assert (len(sig.title), len(sig.guilty_frame or ""), len(sig.guilty_module or "")) == (512, 256, 64)
    assert sig.channel_file is None  # a cut path would name another file
    assert "\x00" not in sig.excerpt and len(sig.excerpt) == 16384
    canonical_json(sig.model_dump(mode="json"))  # encodable: no lone surrogates
    assert len(notes) == 7, notes


def test_a_parser_that_fails_costs_that_text_only(tmp_path: Path, monkeypatch) -> None:
    pstore = tmp_path / "pstore"
    pstore.mkdir()
    (pstore / "dmesg-ramoops-0").write_text(PANIC)
    log = tmp_path / "console.log"
    log.write_text(PANIC)
    calls: list[str] = []
    real = detect_module.parse_crash

    def flaky(text: str, source: str = ""):
        calls.append(source)
        if source.startswith("pstore:"):
            raise RecursionError("a bug in the parser")
        return real(text, source)

    monkeypatch.setattr(detect_module, "parse_crash", flaky)
    found = examine(pstore, boot_log=log, boot_count=2)
    assert found.crash.title == "general protection fault in sensor_parse_channel"
    assert found.crash.source == f"log:{log}"
    assert any("the crash parser failed (RecursionError" in n for n in found.notes)


def test_lines_are_cut_before_the_parser_sees_them(tmp_path: Path, monkeypatch) -> None:
    """One console line of 200,000 spaces (normalisation was quadratic in it)."""
    log = tmp_path / "console.log"
    log.write_text(PANIC.replace("general protection fault", "general protection fault" + " " * 200_000))
    seen: list[str] = []
    real = detect_module.parse_crash
    monkeypatch.setattr(
        detect_module, "parse_crash", lambda text, source="": seen.append(text) or real(text, source)
    )
    found = examine(None, boot_log=log, boot_count=2)
    assert max(len(line) for text in seen for line in text.splitlines()) <= LINE_LIMIT
    assert any(f"lines over {LINE_LIMIT} characters cut" in n for n in found.notes)
    assert found.crash.kind is CrashKind.KERNEL_PANIC


# --------------------------------------------------------------------------- reading the logs


def test_only_the_tail_of_a_boot_log_is_read(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    with open(log, "w") as f:
        f.write("x" * 80 + "\n")
        f.write(("filler line\n") * (BOOT_LOG_LIMIT // 12 + 1000))
        f.write(PANIC)
    evidence = detect_module.read_evidence(log, BOOT_LOG_LIMIT)
    assert len(evidence.text.encode()) <= BOOT_LOG_LIMIT and evidence.cut > 0
    assert not evidence.text.startswith("x")
    found = examine(None, boot_log=log, boot_count=2)
    assert found.crash.title == "general protection fault in sensor_parse_channel"
    assert any(f"only the last {BOOT_LOG_LIMIT} read" in n for n in found.notes)


def test_pstore_reads_are_bounded_per_record_and_in_all(tmp_path: Path) -> None:
    pstore = tmp_path / "pstore"
    pstore.mkdir()
    big = "console line\n" * (3 * PSTORE_RECORD_LIMIT // 13)
    for i in range(8):
        (pstore / f"console-ramoops-{i}").write_text(big)
        os.utime(pstore / f"console-ramoops-{i}", (1_700_000_000 + i, 1_700_000_000 + i))
    scan = read_pstore(pstore)
    assert all(len(r.text.encode()) <= PSTORE_RECORD_LIMIT for r in scan.records)
    assert sum(len(r.text.encode()) for r in scan.records) <= PSTORE_TOTAL_LIMIT
    assert [r.name for r in scan.records] == [f"console-ramoops-{i}" for i in (7, 6, 5, 4)]  # newest
    assert any("4 older records not read" in n for n in scan.notes)


def test_a_pstore_dump_keeps_its_header_when_cut(tmp_path: Path) -> None:
    pstore = tmp_path / "pstore"
    pstore.mkdir()
    filler = "<6>[    0.1] filler\n" * (PSTORE_RECORD_LIMIT // 20 + 10)
    (pstore / "dmesg-ramoops-0").write_text("Panic#1 Part1\n" + filler + PANIC)
    [record] = read_pstore(pstore).records
    assert record.reason == "Panic"


def test_fifos_and_symlinks_are_never_read(tmp_path: Path) -> None:
    """A FIFO would block the agent for ever; a symlink could point at its own key."""
    pstore = tmp_path / "pstore"
    pstore.mkdir()
    os.mkfifo(pstore / "dmesg-ramoops-0")
    secret = tmp_path / "device.key"
    secret.write_text(PANIC)
    os.symlink(secret, pstore / "console-ramoops-0")
    fifo_log = tmp_path / "console.log"
    os.mkfifo(fifo_log)
    progress = tmp_path / "boot-progress.log"
    os.symlink(secret, progress)
    found = examine(pstore, boot_log=fifo_log, boot_count=2, boot_progress=progress)
    assert found.crash.kind is CrashKind.UNKNOWN
    assert any("is not a regular file" in n for n in found.notes)
    assert any("could not read boot progress log" in n for n in found.notes)


def test_pstore_names_and_bytes_of_any_kind(tmp_path: Path) -> None:
    pstore = tmp_path / "pstore"
    pstore.mkdir()
    (
        pstore / "dmesg-ramoops-\udcff".encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")
    ).write_bytes(b"\xff\xfe\x00garbage")
    (pstore / "dmesg-ramoops-1").write_bytes(b"Panic#1 Part" + b"9" * 5000 + b"\n" + PANIC.encode())
    (pstore / "console-ramoops-0").write_bytes(b"\x00" * 5000 + PANIC.encode("utf-16"))
    for i in range(40):
        (pstore / f"dmesg-ramoops-{i + 2}.enc.z").write_bytes(b"\x78\x9c")
    found = examine(pstore, boot_count=2)
    json.dumps(found.crash.model_dump(mode="json"), ensure_ascii=False).encode()
    assert len([n for n in found.notes if ".enc.z" in n]) == 1


# --------------------------------------------------------------------------- grubenv counters


@pytest.mark.parametrize("boot_count", [10_000_000, "99999999999999999999"])
async def test_a_huge_boot_count_is_one_number_not_a_record_per_boot(
    fleet, machine, clock, boot_count
) -> None:
    set_grub(machine, boot_count=boot_count, recovery_attempts="99999999999999999999")
    outcome, [diagnostics] = await run_once(fleet, machine, clock)
    assert outcome is Outcome.NEEDS_MANUAL  # attempts, clamped, are over the limit
    boot = diagnostics.boot
    assert boot.boot_count == min(int(boot_count), COUNTER_MAX)
    assert boot.recovery_attempts == COUNTER_MAX
    assert len(boot.history) == HISTORY_LIMIT
    assert boot.history[-1].index == boot.boot_count - 1
    assert any(f"the last {HISTORY_LIMIT} listed" in n for n in diagnostics.notes)
    assert any(f"recovery_attempts is over {COUNTER_MAX}" in n for n in diagnostics.notes)
    assert [d.recovery_attempts for d in fleet.service.devices(fleet.viewer)] == [COUNTER_MAX]


# --------------------------------------------------------------------------- the OS tree


def _channel_files(machine: Path, count: int) -> None:
    channels = machine / "os" / CHANNELS
    for i in range(count):
        path = channels / f"C-{i:08d}-00000000-00000001.sys"
        path.write_bytes(b"channel %d\n" % i)
        os.utime(path, (1_600_000_000 + i, 1_600_000_000 + i))


@pytest.mark.parametrize("count", [4000, 5000])
async def test_thousands_of_channel_files_are_reported(fleet, machine, clock, count: int) -> None:
    """4,000 made the body go over 1 MiB (413); 5,000 failed the wire's list limit."""
    _channel_files(machine, count)
    outcome, [diagnostics] = await run_once(fleet, machine, clock)
    assert outcome is Outcome.NO_REMEDIATION
    files = diagnostics.channel_files
    assert len(files) == FILES_PER_KIND
    found = count + 3  # the machine's own three
    assert (
        f"channel_files: {found} found, {FILES_PER_KIND} listed (the files the crash names first, "
        "then most recently changed first)"
    ) in diagnostics.notes
    # The one the crash names, then the newest.
    names = {f.path.rsplit("/", 1)[1] for f in files}
    assert "C-00000291-00000000-00000032.sys" in names
    assert f"C-{count - 1:08d}-00000000-00000001.sys" in names
    assert "C-00000000-00000000-00000001.sys" not in names


async def test_a_report_is_trimmed_to_the_body_limit(fleet, machine, clock) -> None:
    """Long paths: a thousand drivers and channel files whose records alone are over 1 MiB."""
    _channel_files(machine, 1200)
    extra = machine / "os/lib/modules/6.1.0-test/extra"
    deep = extra / "/".join(["d" * 200] * 4)
    deep.mkdir(parents=True)
    for i in range(FILES_PER_KIND):
        (deep / f"{i:04d}-{'m' * 100}.ko").write_bytes(b"\x7fELF module %d\n" % i)
    outcome, [diagnostics] = await run_once(fleet, machine, clock)
    assert outcome is Outcome.NO_REMEDIATION
    assert len(diagnostics.drivers) < FILES_PER_KIND
    assert any("the report must stay under 1048576 bytes" in n for n in diagnostics.notes)
    assert "C-00000291-00000000-00000032.sys" in {f.path.rsplit("/", 1)[1] for f in diagnostics.channel_files}


def _records(n: int, path_length: int) -> list[FileRecord]:
    return [
        FileRecord(path=f"lib/{i:05d}-" + "p" * (path_length - 10), size=i, mtime=float(i), sha256=SHA)
        for i in range(n)
    ]


def test_seal_within_drops_the_least_recently_changed_files_with_a_note() -> None:
    key = SigningKey.generate()
    big = Findings(
        device_id="dev-1",
        agent_version="t",
        boot=BootState(boot_count=2, boot_limit=2),
        crash=CrashSignature(kind=CrashKind.UNKNOWN, title="t", excerpt="e" * 16384),
        system=SystemInfo(),
        drivers=_records(1000, 1000),
        channel_files=_records(1000, 300),
        driver_store=_records(1000, 1000),
        recent_changes=_records(10, 1000),
        notes=[f"note {i}" for i in range(200)],
    )
    diagnostics = big.diagnostics(server_nonce="n" * 32, agent_nonce="a" * 32, created_at=utcnow())
    sealed = seal_within(diagnostics, key)
    assert len(sealed.body) <= MAX_ENVELOPE_BYTES
    sent = Diagnostics.model_validate_json(base64.b64decode(json.loads(sealed.body)["payload"]))
    assert sent == sealed.diagnostics
    assert len(sent.notes) == 64 and sent.notes[-1].endswith("more notes left out")
    assert any(n.startswith("drivers: 1000 listed,") for n in sent.notes)
    # The newest of each trimmed list are the ones kept.
    assert min(f.mtime for f in sent.drivers) > 1000 - len(sent.drivers) - 1


def test_deep_and_odd_trees_are_walked_within_the_caps(tmp_path: Path) -> None:
    root = tmp_path / "os"
    extra = root / "lib/modules/6.1.0-test/extra"
    deep = extra / "/".join(["d"] * 40)
    deep.mkdir(parents=True)
    (deep / "deep.ko").write_bytes(b"\x7fELF")
    (extra / "top.ko").write_bytes(b"\x7fELF")
    os.mkfifo(extra / "fifo.ko")
    os.symlink("/etc/passwd", extra / "link.ko")
    (
        extra / "bad-\udcff.ko".encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")
    ).write_bytes(b"x")
    notes: list[str] = []
    records = collect_drivers(root, notes=notes)
    assert [r.path for r in records] == ["lib/modules/6.1.0-test/extra/top.ko"]
    assert any(f"deeper than {WALK_DEPTH_LIMIT} levels" in n for n in notes)
    assert any("names are not UTF-8" in n for n in notes)


def test_the_crash_names_files_listed_whatever_their_age(tmp_path: Path) -> None:
    root = tmp_path / "os"
    channels = root / CHANNELS
    channels.mkdir(parents=True)
    for i in range(30):
        (channels / f"C-{i:04d}.sys").write_bytes(b"x")
        os.utime(channels / f"C-{i:04d}.sys", (1000 + i, 1000 + i))
    notes: list[str] = []
    named = f"{CHANNELS}/C-0000.sys"
    records = collect_channel_files(root, notes=notes, limit=5, first=lambda p: p == named)
    assert [r.path for r in records] == [named] + [f"{CHANNELS}/C-{i:04d}.sys" for i in range(26, 30)]
    assert notes == [
        "channel_files: 30 found, 5 listed (the files the crash names first, then most recently "
        "changed first)"
    ]


def test_inventory_text_that_is_not_utf8_is_made_sendable(tmp_path: Path) -> None:
    root = tmp_path / "os"
    kver = "6.1.0-\udcff".encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")
    (root / "lib/modules" / kver / "extra").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc/hostname").write_bytes(b"host\x00\xff\n")
    inv = inventory.collect(root)
    canonical_json(inv.system.model_dump(mode="json"))
    assert "\x00" not in inv.system.hostname
