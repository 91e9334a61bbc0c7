#!/usr/bin/env python3
"""Benchmark the time to recovery (TTR) against the boots a recovery cannot do without.

In one run, on the lab's OS (the ``--base lab`` images, built or taken from the cache), under
QEMU TCG, one VM at a time:

1. **The loop**: ``recovery-lab run channel-file --auto-approve`` (``recovery_lab.loop``, with
   its server in this process). TTR is from the VM's start to the fixed boot's
   ``QMR-HEALTHY`` marker (its ``boot_count`` reset); the health report that follows is timed
   too but is not part of TTR.
2. **The boots themselves**:
   - the failing OS boot, measured twice in one VM: a copy of the ``channel-file`` disk
     whose recovery partition holds the same kernel with a *do-nothing* initramfs (busybox and
     an ``/init`` that prints a marker and powers off; gzip'd like the real one). Boot 1 is
     from the VM's start to its panic, boot 2 from the reset to its panic;
   - the recovery kernel with that do-nothing initramfs, booted by the same firmware, GRUB,
     grub.cfg and disk (boot 3 of the same VM: GRUB's count reached 2): from the reset to
     the marker. So GRUB reads the same kernel from the same partition, and only the
     initramfs (and what its init does) differs from the loop's recovery boot;
   - one healthy OS boot: the ``healthy`` scenario's image, from the VM's start to
     ``QMR-HEALTHY``.

   These boot on the loop's hardware: the same NIC (user networking, nothing listening) and a
   seed disk without settings, which the images ignore.

It prints each figure; the sum of the boots; TTR; the ratio TTR / boots, with each failing
boot counted to its panic (the scale issue's count) and, beside it, to its reset (the
kernel's ``panic=5`` wait counted as part of the boot, since the recovery path does not
own it); and where the
excess goes, phase by phase (the failed boots' panic-to-reset wait, GRUB reading kernel and
initramfs and the kernel unpacking it, modules and pstore, mounts and network, Python's
start, the agent's work, the reboot, the fixed boot), and the health report after TTR.
Times are host seconds read off the console (lines are stamped when read, every 50 ms) and
QMP events. Nothing is asserted: figures vary from run to run and with the machine's load.

    taskset -c 1 .venv/bin/python scripts/bench_ttr.py [--boot-timeout 300] [--loop-timeout 900]

``--json PATH`` also writes the figures as JSON; ``--keep`` keeps the runs' folders.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recovery_lab.boot import BootReport, follow_boot  # noqa: E402
from recovery_lab.build import build_image  # noqa: E402
from recovery_lab.build.files import install_busybox, mkfs_ext4, newc_initramfs, write_file  # noqa: E402
from recovery_lab.build.initramfs import RECOVERY_HASH_SEED, RECOVERY_UUID  # noqa: E402
from recovery_lab.disk import partition_mib  # noqa: E402
from recovery_lab.faults import partition_offset, sparse_copy  # noqa: E402
from recovery_lab.inspect import DiskImage  # noqa: E402
from recovery_lab.loop import RunOptions, run_async  # noqa: E402
from recovery_lab.qemu import Drive, MachineConfig  # noqa: E402
from recovery_lab.seed import make_seed_disk  # noqa: E402
from recovery_lab.timeline import EntryKind  # noqa: E402

RECOVERY_PART = 3
NOTHING_MARKER = "QMR-BENCH do-nothing init"
NOTHING_INIT = f"""#!/bin/sh
echo "{NOTHING_MARKER}"
/bin/busybox poweroff -f
"""

# Console lines timed here that are no timeline entry.
BANNER = re.compile(r"Linux version \d")
RUN_INIT = re.compile(r"Run /init as init process")
AGENT_START = re.compile(r"QMR-RECOVERY-AGENT start")
AGENT_LINE = re.compile(r"^\[agent \+")
RECOVERY_POINTS = (
    "grub",
    "banner",
    "run_init",
    "recovery_begin",
    "agent_start",
    "agent_line",
    "agent_exit",
    "end",
)


# --------------------------------------------------------------------------- the machines


def do_nothing_disk(image: Path, work: Path) -> Path:
    """A copy of ``image`` whose recovery partition holds its own kernel and a do-nothing
    initramfs (same ext4 identity and size, so GRUB's path to it is the same)."""
    copy = sparse_copy(image, work / "do-nothing.img")
    with DiskImage(image) as d:
        vmlinuz = d.ext4_file(RECOVERY_PART, "/boot/vmlinuz")
    if vmlinuz is None:
        sys.exit(f"{image}: no /boot/vmlinuz on partition {RECOVERY_PART}")
    root = work / "nothing-root"
    for sub in ("proc", "sys", "dev", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    install_busybox(root)
    write_file(root / "init", NOTHING_INIT, 0o755)
    initramfs = work / "nothing-initrd.img"
    newc_initramfs(root, initramfs)
    part_root = work / "nothing-part"
    write_file(part_root / "boot" / "vmlinuz", vmlinuz)
    write_file(part_root / "boot" / "initrd.img", initramfs.read_bytes())
    ext4 = work / "nothing-recovery.ext4"
    mkfs_ext4(part_root, ext4, partition_mib("recovery"), RECOVERY_UUID, RECOVERY_HASH_SEED, "qmr-recovery")
    offset = partition_offset(copy, RECOVERY_PART)
    chunk = 1 << 20
    with open(ext4, "rb") as src, open(copy, "r+b") as dst:
        pos = 0
        while data := src.read(chunk):
            dst.seek(offset + pos)
            dst.write(data)  # the whole slot: no block of the old partition may remain
            pos += len(data)
    print(f"do-nothing initramfs: {initramfs.stat().st_size / 1e6:.2f} MB (gzip)")
    return copy


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def boot(image: Path, timeout: float, work: Path, name: str, stop_on: str | None = None) -> BootReport:
    """Boot ``image`` on the loop's hardware: its NIC (forwarding to a port nothing listens
    on; no connection is made) and a seed disk, empty of settings, so that the images behave
    as without one (firmware and kernel probe the same devices as in the loop)."""
    seed = make_seed_disk(work / f"{name}-seed.img", {"bench.txt": b"no settings: the images ignore it\n"})
    config = MachineConfig(
        disk=image,
        disk_format="raw",
        forward_port=_free_port(),
        extra_drives=[Drive(seed, "raw", "virtio", readonly=True)],
    )
    report = await follow_boot(
        config, timeout=timeout, keep_logs=True, run_dir=work / name, name=name, stop_on=stop_on
    )
    if report.outcome in ("timed-out", "qemu-exited"):
        print(f"{name}: {report.outcome} after {report.seconds:.0f} s; logs in {report.run_dir}")
    return report


# --------------------------------------------------------------------------- reading a run


def _first(report: BootReport, pattern: re.Pattern[str], start: float, end: float) -> float | None:
    return next(
        (ln.seconds for ln in report.console_lines if start <= ln.seconds < end and pattern.search(ln.text)),
        None,
    )


def _entry(report: BootReport, kind: EntryKind, start: float, end: float) -> float | None:
    return next((e.seconds for e in report.timeline.of_kind(kind) if start <= e.seconds < end), None)


def boots_of(report: BootReport) -> list[dict[str, float | None]]:
    """Each boot's points in host seconds since the VM started: from its start (0 or the reset
    that began it) to its end (the next reset, or the VM's end)."""
    resets = [e.seconds for e in report.timeline.of_kind(EntryKind.RESET) if e.seconds > 1.0]
    starts = [0.0, *resets]
    ends = [*resets, float("inf")]
    out = []
    for start, end in zip(starts, ends, strict=True):
        pts: dict[str, float | None] = {
            "start": start,
            "end": end if end != float("inf") else None,
            "grub": _entry(report, EntryKind.GRUB_ENTRY, start, end),
            "banner": _first(report, BANNER, start, end),
            "run_init": _first(report, RUN_INIT, start, end),
            "panic": _entry(report, EntryKind.PANIC, start, end),
            "nothing": _first(report, re.compile(re.escape(NOTHING_MARKER)), start, end),
            "recovery_begin": _entry(report, EntryKind.RECOVERY_BEGIN, start, end),
            "agent_start": _first(report, AGENT_START, start, end),
            "agent_line": _first(report, AGENT_LINE, start, end),
            "agent_exit": _entry(report, EntryKind.AGENT_EXIT, start, end),
            "healthy": _entry(report, EntryKind.HEALTHY, start, end),
            "health_report": _entry(report, EntryKind.HEALTH_REPORT, start, end),
        }
        out.append(pts)
    return out


def _d(b: dict[str, float | None], a: str, z: str) -> float | None:
    x, y = b.get(a), b.get(z)
    return None if x is None or y is None else y - x


# --------------------------------------------------------------------------- the run


async def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    say = print if args.verbose else (lambda _msg: None)
    channel = build_image("channel-file", log=say)
    healthy = build_image("healthy", log=say)
    figures: dict[str, Any] = {}

    # The boots themselves.
    nothing = do_nothing_disk(channel.image, work)
    print("booting: channel-file with the do-nothing recovery initramfs (panic, panic, recovery)")
    rep = await boot(nothing, args.boot_timeout, work, "boots-failing")
    b = boots_of(rep)
    if len(b) < 3 or b[2]["nothing"] is None:
        sys.exit(f"the do-nothing run did not reach its recovery marker ({rep.outcome}); logs: {rep.run_dir}")
    figures["failing_boot_1_to_panic"] = _d(b[0], "start", "panic")
    figures["failing_boot_2_to_panic"] = _d(b[1], "start", "panic")
    figures["failing_boot_1_to_reset"] = _d(b[0], "start", "end")
    figures["failing_boot_2_to_reset"] = _d(b[1], "start", "end")
    figures["recovery_bare"] = _d(b[2], "start", "nothing")
    figures["bare_points"] = {k: _d(b[2], "start", k) for k in ("grub", "banner", "run_init", "nothing")}

    print("booting: healthy")
    rep = await boot(healthy.image, args.boot_timeout, work, "boot-healthy", stop_on="QMR-HEALTHY")
    hb = boots_of(rep)
    if hb[0]["healthy"] is None:
        sys.exit(f"the healthy boot did not reach QMR-HEALTHY ({rep.outcome}); logs: {rep.run_dir}")
    figures["healthy_boot"] = _d(hb[0], "start", "healthy")

    # The loop.
    print("running: the loop, channel-file --auto-approve")
    report = await run_async(
        RunOptions(
            scenario="channel-file",
            auto_approve=True,
            timeout_s=args.loop_timeout,
            workdir=work / "loop",
            keep=args.keep,
            log=say,
        )
    )
    if not report.recovered or report.boot is None:
        sys.exit(f"the loop did not recover ({report.outcome}: {report.problems}); folder {report.workdir}")
    lb = boots_of(report.boot)
    rec = next((x for x in lb if x["recovery_begin"] is not None), None)
    fixed = next((x for x in reversed(lb) if x["healthy"] is not None), None)
    if rec is None or fixed is None or len(lb) < 4:
        sys.exit(f"the loop's boots are not panic, panic, recovery, healthy: {report.boot.entries_chosen}")
    figures["loop"] = {
        "failed_boots": rec["start"],
        "failed_boot_panics": [_d(lb[0], "start", "panic"), _d(lb[1], "start", "panic")],
        "recovery": {k: _d(rec, "start", k) for k in RECOVERY_POINTS},
        "fixed_boot": _d(fixed, "start", "healthy"),
        "health_report": _d(fixed, "healthy", "health_report"),
    }
    figures["ttr"] = fixed["healthy"]
    figures["ttr_health_reported"] = fixed["health_report"]
    figures["loop_workdir"] = report.workdir
    return figures


def render(f: dict[str, Any]) -> str:
    def s(v: float | None) -> str:
        return "   -   " if v is None else f"{v:7.1f}"

    fail1, fail2 = f["failing_boot_1_to_panic"], f["failing_boot_2_to_panic"]
    boots = fail1 + fail2 + f["recovery_bare"] + f["healthy_boot"]
    boots_to_reset = (
        f["failing_boot_1_to_reset"] + f["failing_boot_2_to_reset"] + f["recovery_bare"] + f["healthy_boot"]
    )
    ttr = f["ttr"]
    loop = f["loop"]
    reset1 = s(f["failing_boot_1_to_reset"]).strip()
    reset2 = s(f["failing_boot_2_to_reset"]).strip()
    r = loop["recovery"]
    bare = f["bare_points"]
    lines = [
        "",
        "The boots themselves (host seconds):",
        f"  failing OS boot 1, VM start to its panic      {s(fail1)}   (to its reset: {reset1})",
        f"  failing OS boot 2, reset to its panic         {s(fail2)}   (to its reset: {reset2})",
        f"  recovery kernel, do-nothing initramfs         {s(f['recovery_bare'])}   "
        f"(GRUB's choice {s(bare['grub']).strip()}, kernel banner {s(bare['banner']).strip()}, "
        f"Run /init {s(bare['run_init']).strip()})",
        f"  healthy OS boot, VM start to QMR-HEALTHY      {s(f['healthy_boot'])}",
        f"  sum of the boots                              {s(boots)}",
        "",
        f"Time to recovery (VM start to the fixed boot's QMR-HEALTHY): {ttr:.1f} s",
        f"Ratio TTR / boots: {ttr / boots:.3f} (each failing boot counted to its panic)",
        f"                   {ttr / boots_to_reset:.3f} (each failing boot counted to its reset: "
        f"the kernel's panic=5 wait as part of the boot; boots {boots_to_reset:.1f} s)",
        "",
        "Where the excess goes (loop minus the boots):",
    ]
    rows: list[tuple[str, float | None]] = [
        ("failed boots: panic to reset (panic=5), twice", loop["failed_boots"] - fail1 - fail2),
        (
            "recovery: reset to Run /init (firmware, GRUB reads kernel + initramfs, unpack)",
            None if r["run_init"] is None or bare["run_init"] is None else r["run_init"] - bare["run_init"],
        ),
        (
            "recovery: Run /init to QMR-RECOVERY-BEGIN (modules, pstore)",
            _sub(r, "run_init", "recovery_begin"),
        ),
        ("recovery: to QMR-RECOVERY-AGENT start (mounts, DHCP)", _sub(r, "recovery_begin", "agent_start")),
        ("recovery: to the agent's first line (Python start, imports)", _sub(r, "agent_start", "agent_line")),
        ("recovery: the agent's work (report, approval, apply)", _sub(r, "agent_line", "agent_exit")),
        ("recovery: agent exit to reset (sync, unmount, reboot)", _sub(r, "agent_exit", "end")),
        (
            "recovery: less the do-nothing init's own Run /init to marker",
            None if bare["run_init"] is None else -(bare["nothing"] - bare["run_init"]),
        ),
        ("fixed boot: reset to QMR-HEALTHY, less the healthy boot", loop["fixed_boot"] - f["healthy_boot"]),
    ]
    for name, v in rows:
        lines.append(f"  {name:<82} {s(v)}")
    lines += [
        f"  {'total excess (TTR - boots)':<82} {s(ttr - boots)}",
        "",
        "The loop's recovery boot, from the reset after the second panic: "
        + ", ".join(f"{k} {s(v).strip()}" for k, v in r.items()),
        "After TTR: the health report (QMR-HEALTHY to QMR-HEALTH-REPORTED) "
        f"{s(loop['health_report']).strip()} s (reported at {s(f['ttr_health_reported']).strip()} s)",
    ]
    return "\n".join(lines)


def _sub(r: dict[str, float | None], a: str, z: str) -> float | None:
    x, y = r.get(a), r.get(z)
    return None if x is None or y is None else y - x


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boot-timeout", type=float, default=300.0, help="seconds per VM of the boots")
    parser.add_argument("--loop-timeout", type=float, default=900.0, help="seconds for the loop's VM")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the runs' folders (printed)")
    parser.add_argument("--verbose", action="store_true", help="print the builds' and the loop's progress")
    args = parser.parse_args()
    cache = Path(os.environ.get("QMR_CACHE", REPO / ".cache/qmr"))
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="qmr-bench-ttr-", dir=cache))
    try:
        figures = asyncio.run(measure(args, work))
        print(render(figures))
        if args.json:
            args.json.write_text(json.dumps(figures, indent=1) + "\n")
    finally:
        if args.keep:
            print(f"runs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
