"""crashreport and detect: crash signatures from real Debian 12 (Linux 6.1) panics and
hand-written snippets."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from recovery_agent.detect import detect, read_pstore, stopped_step
from recovery_agent.protocol.crashreport import EXCERPT_LIMIT, normalise_title, parse_crash
from recovery_agent.protocol.wire import CrashKind

DATA = Path(__file__).parent / "data" / "panic"
CHANNEL_FILE = "var/lib/sensor/channels/C-00000291-00000000-00000032.sys"


def real(name: str) -> str:
    """A log captured from Debian 12's kernel under QEMU (tests/data/panic/src/capture.sh)."""
    path = DATA / name
    if not path.exists():
        pytest.skip(f"real capture {path} is missing: run tests/data/panic/src/capture.sh")
    return path.read_text()


# --------------------------------------------------------------------------- real captures


@pytest.mark.parametrize(
    "name, kind",
    [
        ("channel-file-console.txt", CrashKind.KERNEL_PANIC),
        ("channel-file-pstore.txt", CrashKind.KERNEL_PANIC),  # "Panic#2 Part1" dump
        ("channel-file-pstore-oops.txt", CrashKind.OOPS),  # "Oops#1 Part1" dump, before panic
    ],
)
def test_channel_file_crash(name: str, kind: CrashKind) -> None:
    sig = parse_crash(real(name), name)
    assert sig is not None
    assert sig.kind is kind
    assert sig.title == "general protection fault in sensor_parse_channel"
    assert sig.guilty_frame == "sensor_parse_channel"
    assert sig.guilty_module == "sensor"
    # The last file named before the oops, not the good one loaded just before it.
    assert sig.channel_file == CHANNEL_FILE
    assert sig.source == name
    assert "general protection fault, probably for non-canonical" in sig.excerpt.splitlines()[0]
    assert "RIP: 0010:sensor_parse_channel+0x11d/0xf68 [sensor]" in sig.excerpt
    assert "loading channel file" not in sig.excerpt
    assert len(sig.excerpt.encode()) <= EXCERPT_LIMIT


def test_same_crash_same_id_across_logs() -> None:
    """Different addresses, PIDs and timestamps; one incident."""
    console = parse_crash(real("channel-file-console.txt"))
    pstore = parse_crash(real("channel-file-pstore.txt"))
    assert console is not None and pstore is not None
    assert console.id == pstore.id


def test_excerpt_keeps_timestamps_and_ends_with_the_panic() -> None:
    sig = parse_crash(real("channel-file-console.txt"))
    assert sig is not None
    lines = sig.excerpt.splitlines()
    assert re.match(r"\[ +\d+\.\d{6}\] general protection fault", lines[0])
    assert re.match(r"\[ +\d+\.\d{6}\] Rebooting in 5 seconds\.\.$", lines[-1])


def test_null_pointer_dereference() -> None:
    sig = parse_crash(real("null-deref-console.txt"))
    assert sig is not None
    assert sig.kind is CrashKind.KERNEL_PANIC
    # RIP is widget_read_rate.constprop.0: the compiler's clone suffix is not part of the bug.
    assert sig.title == "BUG: kernel NULL pointer dereference in widget_read_rate"
    assert sig.guilty_frame == "widget_read_rate"
    assert sig.guilty_module == "nullderef"
    assert sig.channel_file is None
    assert sig.excerpt.splitlines()[-1].endswith("---[ end Kernel panic - not syncing: Fatal exception ]---")


def test_init_died() -> None:
    sig = parse_crash(real("init-exit-console.txt"))
    assert sig is not None
    assert sig.kind is CrashKind.INIT_DIED
    assert sig.title == "kernel panic: Attempted to kill init!"
    assert sig.guilty_frame is None


def test_soft_lockup() -> None:
    """The spinning driver trips the RCU stall detector first, then the soft lockup detector:
    one title for both, whichever fired first."""
    text = real("sensor-hang-console.txt")
    sig = parse_crash(text)
    assert sig is not None
    assert sig.kind is CrashKind.HANG
    assert sig.title == "BUG: soft lockup in sensor_init"
    assert sig.guilty_frame == "sensor_init"
    assert sig.guilty_module == "sensor"
    # Only the first of the repeated lockup reports.
    assert sig.excerpt.count("soft lockup") == 1

    # Reset before the soft lockup detector fired: the RCU stall is all there is. Its first
    # stack is the RCU kthread's (generic); the guilty frame comes from the stalled CPU's RIP.
    if "rcu_preempt detected stalls" in text:
        stall_only = parse_crash(text[: text.index("BUG: soft lockup")])
        assert stall_only is not None
        assert stall_only.kind is CrashKind.HANG
        assert stall_only.title == "INFO: rcu detected stall in sensor_init"
        assert stall_only.guilty_module == "sensor"


def test_driver_panics_on_purpose() -> None:
    """sensor.ko strict=1 calls panic() itself on the bad channel file: no oops, only the
    panic's own call trace, whose first frame below panic() (and dump_stack_lvl) is the
    driver's."""
    sig = parse_crash(real("sensor-panic-console.txt"))
    assert sig is not None
    assert sig.kind is CrashKind.KERNEL_PANIC
    # The message with its numbers taken out (the same title for every bad channel file).
    assert sig.title == (
        "kernel panic: sensor: channel file /var/lib/sensor/channels/C---.sys is corrupt: "
        "template has fields, content"
    )
    assert (sig.guilty_frame, sig.guilty_module, sig.corrupted) == ("sensor_parse_channel", "sensor", False)
    assert sig.channel_file == CHANNEL_FILE
    lines = sig.excerpt.splitlines()
    assert "Kernel panic - not syncing: sensor: channel file" in lines[0]
    assert any(line.endswith(" panic+0x118/0x2f4") for line in lines)
    assert lines[-1].endswith("Rebooting in 5 seconds..")
    # Another bug than the GPF the same file causes without strict=1: another incident.
    gpf = parse_crash(real("channel-file-console.txt"))
    assert gpf is not None and gpf.id != sig.id


# The other kinds Debian's kernel prints, from tests/data/panic/src/crashkinds.c (a driver
# whose init goes wrong as kind= says): (capture, kind, title, guilty frame, module, corrupted).
DEBIAN_KINDS = [
    # BUG_ON() in gadget_claim_slot: "kernel BUG at crashkinds.c:54!", "invalid opcode", the
    # RIP in gadget_claim_slot.constprop.0 (clone suffix taken off), then "Fatal exception"
    (
        "kernel-bug-console.txt",
        CrashKind.KERNEL_PANIC,
        "kernel BUG in gadget_claim_slot",
        "gadget_claim_slot",
        "crashkinds",
        False,
    ),
    # "divide error: 0000 [#1]", RIP gadget_scale_rate.constprop.0, "Code: Unable to access"
    (
        "divide-error-console.txt",
        CrashKind.KERNEL_PANIC,
        "divide error in gadget_scale_rate",
        "gadget_scale_rate",
        "crashkinds",
        False,
    ),
    # WARN_ON() in gadget_check_state: "WARNING: CPU: 0 PID: 87 at crashkinds.c:49
    # gadget_check_state.constprop.0+0xf/0xfac [crashkinds]", no panic (no panic_on_warn); the
    # module comes from the WARNING line itself, the frame the title names
    (
        "warning-console.txt",
        CrashKind.OOPS,
        "WARNING in gadget_check_state",
        "gadget_check_state",
        "crashkinds",
        False,
    ),
    # insmod blocked in state D: "INFO: task insmod:88 blocked for more than 5 seconds.", no panic
    (
        "hung-task-console.txt",
        CrashKind.HANG,
        "INFO: task hung in gadget_init",
        "gadget_init",
        "crashkinds",
        False,
    ),
]


@pytest.mark.parametrize(
    "name, kind, title, frame, module, corrupted", DEBIAN_KINDS, ids=[k[0] for k in DEBIAN_KINDS]
)
def test_every_kind_debian_prints(
    name: str, kind: CrashKind, title: str, frame: str, module: str, corrupted: bool
) -> None:
    sig = parse_crash(real(name), name)
    assert sig is not None
    assert (sig.kind, sig.title, sig.guilty_frame, sig.guilty_module, sig.corrupted) == (
        kind,
        title,
        frame,
        module,
        corrupted,
    )
    assert sig.channel_file is None  # crashkinds reads no channel files
    # The excerpt, all the server gets, parses to the same signature.
    again = parse_crash(sig.excerpt)
    assert again is not None and again.id == sig.id and again.guilty_module == module


def test_kernel_bug_names_the_bug_line_not_the_trap() -> None:
    sig = parse_crash(real("kernel-bug-console.txt"))
    assert sig is not None
    lines = sig.excerpt.splitlines()
    assert lines[0].endswith("kernel BUG at crashkinds.c:54!")
    assert "invalid opcode: 0000 [#1] PREEMPT SMP NOPTI" in lines[1]
    assert lines[-1].endswith("Rebooting in 5 seconds..")


def test_hung_task_names_the_driver_below_the_wait() -> None:
    """The blocked task's stack is __schedule, schedule, schedule_timeout, __wait_for_common
    (gadget_wait_reset tail-called wait_for_completion, so it is not on the stack), then the
    driver: the first frame that does not wait is the guilty one."""
    sig = parse_crash(real("hung-task-console.txt"))
    assert sig is not None
    lines = sig.excerpt.splitlines()
    assert lines[0].endswith("INFO: task insmod:88 blocked for more than 5 seconds.")
    assert any(line.endswith(" __wait_for_common+0x94/0x1e0") for line in lines)
    assert lines[-1].endswith("</TASK>")  # no panic: the report ends with its stack
    assert "gadget: waiting for the reset to finish" not in sig.excerpt


def test_warning_without_panic_ends_with_its_trace() -> None:
    sig = parse_crash(real("warning-console.txt"))
    assert sig is not None
    lines = sig.excerpt.splitlines()
    assert "WARNING: CPU: 0 PID: 87 at crashkinds.c:49 gadget_check_state.constprop.0+0xf/0xfac" in lines[0]
    assert lines[-1].endswith("---[ end trace 0000000000000000 ]---")
    assert "gadget: probed" not in sig.excerpt  # the driver went on after the warning


# --------------------------------------------------------------------------- pstore


def _pstore(tmp_path: Path, files: dict[str, str], mtime: float = 1_700_000_000) -> Path:
    pstore = tmp_path / "pstore"
    pstore.mkdir()
    for name, text in files.items():
        (pstore / name).write_text(text)
        os.utime(pstore / name, (mtime, mtime))
    return pstore


def test_detect_from_pstore_prefers_the_panic_dump(tmp_path: Path) -> None:
    pstore = _pstore(
        tmp_path,
        {
            "dmesg-ramoops-0": real("channel-file-pstore-oops.txt"),
            "dmesg-ramoops-1": real("channel-file-pstore.txt"),
            "console-ramoops-0": real("channel-file-console.txt"),
        },
    )
    sig = detect(pstore, boot_count=2)
    assert sig.kind is CrashKind.KERNEL_PANIC
    assert sig.title == "general protection fault in sensor_parse_channel"
    assert sig.channel_file == CHANNEL_FILE
    assert sig.source == "pstore:dmesg-ramoops-1"


def test_newest_dump_wins(tmp_path: Path) -> None:
    pstore = _pstore(
        tmp_path,
        {
            "dmesg-ramoops-0": real("null-deref-console.txt"),
            "dmesg-ramoops-1": real("channel-file-pstore.txt"),
        },
    )
    os.utime(pstore / "dmesg-ramoops-0", (1_800_000_000, 1_800_000_000))
    assert detect(pstore).guilty_module == "nullderef"


def test_multi_part_dump_is_joined(tmp_path: Path) -> None:
    """ramoops splits a long dump: Part1 is the end of the log, Part2 the part before it."""
    text = real("channel-file-pstore.txt")
    header, _, body = text.partition("\n")
    assert header == "Panic#2 Part1"
    lines = body.splitlines(keepends=True)
    cut = next(i for i, line in enumerate(lines) if "general protection fault" in line) - 1
    pstore = _pstore(
        tmp_path,
        {
            "dmesg-ramoops-0": "Panic#2 Part1\n" + "".join(lines[cut:]),
            "dmesg-ramoops-1": "Panic#2 Part2\n" + "".join(lines[:cut]),
        },
    )
    records = read_pstore(pstore).records
    assert [r.name for r in records] == ["dmesg-ramoops-1+dmesg-ramoops-0"]
    sig = detect(pstore)
    assert sig.title == "general protection fault in sensor_parse_channel"
    assert sig.channel_file == CHANNEL_FILE


def test_channel_file_taken_from_console_when_dump_lost_it(tmp_path: Path) -> None:
    text = real("channel-file-pstore.txt")
    kept = [line for line in text.splitlines(keepends=True) if "loading channel file" not in line]
    pstore = _pstore(
        tmp_path,
        {
            "dmesg-ramoops-0": "".join(kept),
            "console-ramoops-0": real("channel-file-console.txt"),
        },
    )
    sig = detect(pstore)
    assert sig.source == "pstore:dmesg-ramoops-0"
    assert sig.channel_file == CHANNEL_FILE


def test_compressed_record_skipped_with_note(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pstore = _pstore(tmp_path, {"dmesg-ramoops-0.enc.z": "\x78\x9c garbage"})
    scan = read_pstore(pstore)
    assert scan.records == []
    assert any("dmesg-ramoops-0.enc.z" in note for note in scan.notes)
    sig = detect(pstore, boot_count=2)
    assert sig.kind is CrashKind.UNKNOWN
    assert sig.title == "boot failed 2 times with no crash record"
    assert "dmesg-ramoops-0.enc.z" in sig.excerpt
    assert "dmesg-ramoops-0.enc.z" in caplog.text


def test_nothing_found(tmp_path: Path) -> None:
    empty = _pstore(tmp_path, {})
    assert detect(empty, boot_count=2).kind is CrashKind.UNKNOWN
    assert detect(empty, boot_count=1).title == "boot failed once with no crash record"
    assert detect(None, boot_count=0).kind is CrashKind.NONE
    missing = detect(tmp_path / "nope", boot_count=2)
    assert missing.kind is CrashKind.UNKNOWN
    assert "does not exist" in missing.excerpt


def test_watchdog_reset_without_record_is_a_hang(tmp_path: Path) -> None:
    sig = detect(_pstore(tmp_path, {}), boot_count=2, watchdog_reset=True)
    assert sig.kind is CrashKind.HANG
    assert sig.title == "boot hung: watchdog reset the machine"


def test_watchdog_reset_turns_an_oops_into_a_hang(tmp_path: Path) -> None:
    pstore = _pstore(tmp_path, {"dmesg-ramoops-0": real("channel-file-pstore-oops.txt")})
    sig = detect(pstore, watchdog_reset=True)
    assert sig.kind is CrashKind.HANG
    assert sig.title == "general protection fault in sensor_parse_channel"


def test_boot_log(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text(real("sensor-hang-console.txt"))
    sig = detect(None, boot_log=log, boot_count=2)
    assert sig.kind is CrashKind.HANG
    assert sig.source == f"log:{log}"


# --------------------------------------------------------------------------- hand-written
# The snippets below are hand-written in the Linux 6.1 x86-64 format (not captured).

PAGE_FAULT = """\
[    2.100000] BUG: unable to handle page fault for address: ffffc90000a3f000
[    2.100100] #PF: supervisor write access in kernel mode
[    2.100200] #PF: error_code(0x0002) - not-present page
[    2.100300] PGD 100000067 P4D 100000067 PUD 1001b1067 PMD 0
[    2.100400] Oops: 0002 [#1] PREEMPT SMP NOPTI
[    2.100500] CPU: 1 PID: 213 Comm: modprobe Tainted: G           OE      6.1.0-27-amd64 #1  Debian 6.1.115-1
[    2.100600] RIP: 0010:memset_orig+0x33/0xb0
[    2.100700] Call Trace:
[    2.100800]  <TASK>
[    2.100900]  ? __die_body.cold+0x1a/0x1f
[    2.101000]  ? page_fault_oops+0xd2/0x2b0
[    2.101100]  ? exc_page_fault+0x70/0x170
[    2.101200]  ? asm_exc_page_fault+0x22/0x30
[    2.101300]  ? memset_orig+0x33/0xb0
[    2.101400]  ring_buffer_reset.isra.0+0x4c/0x90 [ringdrv]
[    2.101500]  ringdrv_probe+0x112/0x1f0 [ringdrv]
[    2.101600]  do_one_initcall+0x59/0x220
[    2.101700]  </TASK>
[    2.101800] ---[ end trace 0000000000000000 ]---
"""

KERNEL_BUG = """\
[    3.000000] kernel BUG at drivers/misc/widget.c:42!
[    3.000100] invalid opcode: 0000 [#1] PREEMPT SMP NOPTI
[    3.000200] CPU: 0 PID: 1 Comm: swapper/0 Not tainted 6.1.0-27-amd64 #1  Debian 6.1.115-1
[    3.000300] RIP: 0010:widget_check+0x21/0x30 [widget]
[    3.000400] Call Trace:
[    3.000500]  <TASK>
[    3.000600]  widget_init+0x10/0x1000 [widget]
[    3.000700]  </TASK>
[    3.000800] ---[ end trace 0000000000000000 ]---
[    3.000900] Kernel panic - not syncing: Fatal exception
[    3.001000] ---[ end Kernel panic - not syncing: Fatal exception ]---
"""

HUNG_TASK = """\
[  242.500000] INFO: task modprobe:213 blocked for more than 120 seconds.
[  242.500100]       Tainted: G           OE      6.1.0-27-amd64 #1 Debian 6.1.115-1
[  242.500200] "echo 0 > /proc/sys/kernel/hung_task_timeout_secs" disables this message.
[  242.500300] task:modprobe        state:D stack:0     pid:213   ppid:1      flags:0x00004002
[  242.500400] Call Trace:
[  242.500500]  <TASK>
[  242.500600]  __schedule+0x34d/0x9e0
[  242.500700]  schedule+0x5a/0xd0
[  242.500800]  schedule_timeout+0x118/0x150
[  242.500900]  wait_for_completion+0x86/0x160
[  242.501000]  fw_loader_wait.constprop.0+0x2e/0x60 [fwload]
[  242.501100]  fwload_init+0x44/0x1000 [fwload]
[  242.501200]  do_one_initcall+0x59/0x220
[  242.501300]  </TASK>
[  242.501400] INFO: task kworker/0:1:18 blocked for more than 120 seconds.
[  242.501500] Call Trace:
[  242.501600]  <TASK>
[  242.501700]  other_function+0x1/0x2
[  242.501800]  </TASK>
"""

VFS_PANIC = """\
[    1.900000] VFS: Cannot open root device "vda2" or unknown-block(0,0): error -6
[    1.900100] Please append a correct "root=" boot option; here are the available partitions:
[    1.900200] List of all bdev filesystems:
[    1.900300]  ext4
[    1.900400] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)
[    1.900500] CPU: 0 PID: 1 Comm: swapper/0 Not tainted 6.1.0-27-amd64 #1  Debian 6.1.115-1
[    1.900600] Call Trace:
[    1.900700]  <TASK>
[    1.900800]  dump_stack_lvl+0x44/0x5c
[    1.900900]  panic+0x118/0x2ed
[    1.901000]  mount_block_root+0x1d3/0x1e2
[    1.901100]  </TASK>
[    1.901200] ---[ end Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0) ]---
"""

RCU_STALL = """\
[   30.000000] rcu: INFO: rcu_preempt self-detected stall on CPU
[   30.000100] rcu: \t0-....: (21002 ticks this GP) idle=4bc/1/0x4000000000000000
[   30.000200] \t(t=21003 jiffies g=1057 q=7 ncpus=2)
[   30.000300] CPU: 0 PID: 86 Comm: insmod Tainted: G           OE      6.1.0-27-amd64 #1  Debian 6.1.115-1
[   30.000400] RIP: 0010:spin_forever+0x5/0x10 [spinner]
[   30.000500] Call Trace:
[   30.000600]  <IRQ>
[   30.000700]  rcu_sched_clock_irq.cold+0x15b/0x1c4
[   30.000800]  update_process_times+0x8c/0xc0
[   30.000900]  </IRQ>
"""

WARNING_THEN_GPF = """\
[    1.000000] WARNING: CPU: 0 PID: 1 at drivers/misc/widget.c:123 widget_register+0x55/0x800 [widget]
[    1.000100] RIP: 0010:widget_register+0x55/0x800 [widget]
[    1.000200] ---[ end trace 0000000000000000 ]---
[    1.500000] general protection fault, probably for non-canonical address 0xdead000000000100: 0000 [#1] PREEMPT SMP NOPTI
[    1.500100] RIP: 0010:list_walk+0x1/0x2 [lister]
[    1.500200] ---[ end trace 0000000000000000 ]---
"""


def test_page_fault_skips_memset_and_unreliable_frames() -> None:
    sig = parse_crash(PAGE_FAULT)
    assert sig is not None
    assert sig.kind is CrashKind.OOPS  # no panic followed
    assert sig.title == "BUG: unable to handle page fault in ring_buffer_reset"
    assert sig.guilty_module == "ringdrv"
    assert sig.excerpt.splitlines()[-1].endswith("---[ end trace 0000000000000000 ]---")


def test_kernel_bug() -> None:
    sig = parse_crash(KERNEL_BUG)
    assert sig is not None
    assert sig.kind is CrashKind.KERNEL_PANIC
    assert sig.title == "kernel BUG in widget_check"
    assert sig.guilty_module == "widget"


def test_hung_task_skips_the_scheduler_and_waiting() -> None:
    sig = parse_crash(HUNG_TASK)
    assert sig is not None
    assert sig.kind is CrashKind.HANG
    # schedule, schedule_timeout, wait_for_completion and fw_loader_wait all wait: the task's
    # own code is the first frame that does not.
    assert sig.title == "INFO: task hung in fwload_init"
    assert sig.guilty_module == "fwload"
    assert "kworker" not in sig.excerpt


def test_vfs_panic_has_no_device_numbers() -> None:
    sig = parse_crash(VFS_PANIC)
    assert sig is not None
    assert sig.kind is CrashKind.KERNEL_PANIC
    assert sig.title == "kernel panic: VFS: Unable to mount root fs"
    assert sig.excerpt.splitlines()[-1].startswith("[    1.901200] ---[ end Kernel panic")
    # whoever called panic() is to blame, not panic or dump_stack above it
    assert sig.guilty_frame == "mount_block_root"


def test_rcu_stall() -> None:
    sig = parse_crash(RCU_STALL)
    assert sig is not None
    assert sig.kind is CrashKind.HANG
    assert sig.title == "INFO: rcu detected stall in spin_forever"


def test_warning_only_when_nothing_worse() -> None:
    sig = parse_crash(WARNING_THEN_GPF)
    assert sig is not None
    assert sig.title == "general protection fault in list_walk"
    warning = parse_crash(WARNING_THEN_GPF.split("[    1.500000]")[0])
    assert warning is not None
    assert warning.title == "WARNING in widget_register"


def test_panic_on_warn_blames_the_warning() -> None:
    text = WARNING_THEN_GPF.split("[    1.500000]")[0] + (
        "[    1.000300] Kernel panic - not syncing: kernel: panic_on_warn set ...\n"
    )
    sig = parse_crash(text)
    assert sig is not None
    assert sig.kind is CrashKind.KERNEL_PANIC
    assert sig.title == "WARNING in widget_register"


def test_channel_file_from_an_earlier_boot_is_not_blamed() -> None:
    console = real("channel-file-console.txt")
    earlier = console[: console.index("general protection fault")].rpartition("\n")[0] + "\n"
    sig = parse_crash(earlier + real("null-deref-console.txt"))
    assert sig is not None
    assert sig.guilty_module == "nullderef"
    assert sig.channel_file is None


def test_pstore_prefixes_and_crlf() -> None:
    text = "\r\n".join("<4>" + line for line in KERNEL_BUG.splitlines())
    sig = parse_crash(text)
    assert sig is not None
    assert sig.title == "kernel BUG in widget_check"
    assert "\r" not in sig.excerpt


def test_no_crash() -> None:
    assert parse_crash("[    0.000000] Linux version 6.1.0\n[    1.0] Run /init as init process\n") is None
    assert parse_crash("") is None


def test_excerpt_capped() -> None:
    text = KERNEL_BUG.replace(
        "[    3.000700]  </TASK>", "\n".join(f"[    3.000700]  filler_{i}+0x1/0x2" for i in range(2000))
    )
    sig = parse_crash(text)
    assert sig is not None
    assert len(sig.excerpt.encode()) <= EXCERPT_LIMIT
    assert sig.title == "kernel BUG in widget_check"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("[    1.234567] soft lockup - CPU#0 stuck for 22s! [insmod:63]", "soft lockup - CPU stuck for !"),
        ("Attempted to kill init! exitcode=0x0000000b", "Attempted to kill init!"),
        ("foo+0x11/0x70 at ffff888003c1e000 (error -2)", "foo at"),
        ("ext4 rcu_preempt x86_64", "ext4 rcu_preempt x86_64"),
    ],
)
def test_normalise_title(raw: str, expected: str) -> None:
    assert normalise_title(raw) == expected


# --- the OS's boot progress log (images/os/lib.sh writes it; hand-written here) ---------

PROGRESS_HUNG = """\
2.51 boot start
2.60 start load module sensor
2.75 done load module sensor
2.90 boot complete
1.98 boot start
2.05 start load module sensor
"""


def test_stopped_step_names_the_step_the_last_boot_never_finished() -> None:
    assert stopped_step(PROGRESS_HUNG) == "load module sensor"
    assert stopped_step(PROGRESS_HUNG + "9.1 done load module sensor\n9.2 boot complete\n") is None
    assert stopped_step("") is None


def test_no_crash_record_and_a_stopped_step_is_a_hang_in_that_module(tmp_path: Path) -> None:
    (tmp_path / "pstore").mkdir()
    progress = tmp_path / "boot-progress.log"
    progress.write_text(PROGRESS_HUNG)
    sig = detect(tmp_path / "pstore", boot_count=2, boot_progress=progress)
    assert sig.kind is CrashKind.HANG
    assert sig.title == "boot hung: load module sensor" and sig.guilty_module == "sensor"
    # A crash record wins over the progress log: the crash says more.
    (tmp_path / "pstore" / "dmesg-ramoops-0").write_text((DATA / "channel-file-pstore.txt").read_text())
    assert detect(tmp_path / "pstore", boot_count=2, boot_progress=progress).kind is CrashKind.KERNEL_PANIC
