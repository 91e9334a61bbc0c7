"""The QEMU harness against a real QEMU (TCG): Debian's kernel and a busybox initramfs
(tests/qemu_guest.py, /init = tests/data/guest/init.sh), with a 1 MiB raw disk whose qcow2
overlay carries the guest's "I booted before" mark across resets.

CI installs qemu-system-x86, so a missing QEMU fails here (with the install command) instead
of skipping.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from recovery_lab.boot import follow_boot
from recovery_lab.qemu import MachineConfig, QemuFailedToStart, QemuVM, process
from recovery_lab.timeline import EntryKind
from tests.qemu_guest import HarnessGuest, build_harness_guest

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="session")
def guest() -> HarnessGuest:
    return build_harness_guest()


@pytest.fixture
def base_disk(tmp_path: Path) -> Path:
    path = tmp_path / "base.img"
    path.write_bytes(os.urandom(1 << 20))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def config(guest: HarnessGuest, mode: str, disk: Path | None = None, **kw) -> MachineConfig:
    return MachineConfig(kernel=guest.kernel, initrd=guest.initrd, append=guest.append(mode), disk=disk, **kw)


@pytest.mark.timeout(90)
async def test_split_line_poweroff_and_untouched_base_image(
    guest: HarnessGuest, base_disk: Path, tmp_path: Path
) -> None:
    before = sha256(base_disk)
    chunks: list[bytes] = []
    vm = QemuVM(config(guest, "split", base_disk), run_dir=tmp_path / "run", keep=True)
    feed = vm.console.feed
    vm.console.feed = lambda chunk: (chunks.append(chunk), feed(chunk))[1]  # type: ignore[method-assign]
    async with vm:
        await vm.console.wait_for(r"Run /init as init process", timeout=60)
        boot_s = vm.seconds()
        m = await vm.console.wait_for(r"QMR-SPLIT-AB-END", timeout=30)
        assert m.group(0) == "QMR-SPLIT-AB-END"
        assert await vm.wait_exit(30) == 0
        shutdown = await vm.wait_event("SHUTDOWN", 5)
        assert shutdown.data == {"guest": True, "reason": "guest-shutdown"}
    print(f"boot to init under TCG: {boot_s:.2f} s")
    # The line really came in pieces: some chunk ended inside it.
    assert any(c.rstrip().endswith(b"QMR-SPLIT-A") for c in chunks), chunks[-5:]
    assert "QMR-SPLIT-AB-END" in vm.console.lines()
    # The guest wrote its mark to the overlay, never to the base image.
    assert sha256(base_disk) == before
    compare = subprocess.run(["qemu-img", "compare", "-q", str(base_disk), str(vm.overlay_path)])
    assert compare.returncode == 1, "the guest's write should be in the overlay"
    kept = {p.name for p in vm.run_dir.iterdir()}
    assert {"console.log", "qemu.stderr", "events.jsonl", "cmdline.txt"} <= kept
    assert gone(vm.pid)


@pytest.mark.timeout(120)
async def test_panic_gives_guest_panicked_then_reset_then_next_boot_and_its_report(
    guest: HarnessGuest, base_disk: Path
) -> None:
    """One panic boot, watched two ways: QMP events and console waits on the running VM (a
    ``drive`` beside follow_boot), then follow_boot's report of the same run."""
    before = sha256(base_disk)
    seen: dict[str, float] = {}

    async def watch(vm: QemuVM) -> None:
        panicked = await vm.wait_event("GUEST_PANICKED", 60)
        assert panicked.data == {"action": "run"}  # -action panic=none: event only
        reset = await vm.wait_event("RESET", 30)
        assert reset.data["reason"] == "guest-reset"
        await vm.console.wait_for(r"Linux version", timeout=30, since=vm.console.cursor)
        await vm.console.wait_for(r"QMR-PSTORE dmesg-ramoops-0", timeout=60)
        seen["panic -> RESET"] = reset.seconds - panicked.seconds

    report = await follow_boot(config(guest, "panic", base_disk), timeout=90, drive=watch)
    assert "panic -> RESET" in seen, "the drive saw the panic, the reset and the next boot"
    print(f"panic -> RESET: {seen['panic -> RESET']:.2f} s")
    assert report.outcome == "powered-off" and report.exit_status == 0
    assert report.boots == 2 and report.resets == 1 and report.guest_panicked == 1
    assert report.panics == ["kernel panic: sysrq triggered crash"]
    panics = report.timeline.of_kind(EntryKind.PANIC)
    assert [p.data["title"] for p in panics] == ["kernel panic: sysrq triggered crash"]
    assert report.timeline.count(EntryKind.BOOT) == 2 and report.timeline.count(EntryKind.RESET) == 1
    assert report.pstore_records and report.pstore_records[0].startswith("dmesg-ramoops-")
    assert report.shutdown_reason == "guest-shutdown"
    assert report.run_dir is None, "a successful run's directory is removed unless kept"
    assert sha256(base_disk) == before


@pytest.mark.timeout(120)
async def test_watchdog_fires_and_resets(guest: HarnessGuest, base_disk: Path) -> None:
    report = await follow_boot(config(guest, "watchdog", base_disk), timeout=90)
    print(report.render())
    assert report.outcome == "powered-off"
    assert report.watchdog_fires == 1 and report.resets == 1 and report.boots == 2
    assert report.reached_recovery  # the test guest prints QMR-RECOVERY-BEGIN after a reset
    kinds = report.timeline.kinds()
    assert kinds.index("watchdog") < kinds.index("reset")
    watchdog = report.timeline.of_kind(EntryKind.WATCHDOG)[0]
    assert watchdog.data == {"action": "reset"}


@pytest.mark.timeout(60)
async def test_teardown_quits_a_running_guest(guest: HarnessGuest) -> None:
    async with QemuVM(config(guest, "idle")) as vm:
        await vm.console.wait_for(r"QMR-TEST idle", timeout=45)
        pid = vm.pid
    assert pid is not None and gone(pid)
    assert vm.returncode == 0
    assert vm.events.named("SHUTDOWN")[-1].data["reason"] == "host-qmp-quit"


@pytest.mark.timeout(60)
async def test_teardown_kills_a_qemu_that_does_not_answer(
    guest: HarnessGuest, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("QUIT_TIMEOUT_S", "TERM_TIMEOUT_S", "KILL_TIMEOUT_S"):
        monkeypatch.setattr(process, name, 1.0)
    vm = QemuVM(config(guest, "idle"))
    await vm.start()
    assert vm.pid is not None
    os.kill(vm.pid, 19)  # SIGSTOP: QMP quit goes unanswered, SIGTERM stays pending
    await vm.stop()
    vm.finish()
    assert gone(vm.pid) and vm.returncode == -9


@pytest.mark.timeout(30)
async def test_bad_option_fails_to_start_with_qemu_s_words(guest: HarnessGuest, tmp_path: Path) -> None:
    vm = QemuVM(config(guest, "idle", extra_args=["-device", "no-such-device"]), run_dir=tmp_path / "run")
    with pytest.raises(QemuFailedToStart, match="no-such-device"):
        async with vm:
            pass
    assert (tmp_path / "run/qemu.stderr").is_file(), "a failed run's logs are kept"
    assert vm.pid is not None and gone(vm.pid)


@pytest.mark.timeout(30)
async def test_guestfwd_starts_before_anything_listens(guest: HarnessGuest, tmp_path: Path) -> None:
    """The forward opens one host connection per guest connection (recovery_lab.qemu.forwarder),
    so QEMU no longer needs the server to listen when it starts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening
        async with QemuVM(config(guest, "idle", forward_port=port), run_dir=tmp_path / "run") as vm:
            await vm.console.wait_for(r"Linux version", timeout=25)
    assert "-cmd:" in (tmp_path / "run/cmdline.txt").read_text()
