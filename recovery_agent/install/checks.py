"""The OS's health verdict on an installed machine: run the checks, then mark the boot good.

``recovery-agent health-check`` (:func:`run_checks`, run by ``qmr-health-check.service``
before ``boot-complete.target``) runs every ``*.sh`` script in the check directories, in
greenboot's order and manner (each with bash, sorted by name; greenboot's own directories
first, so existing greenboot checks work unchanged)::

    /usr/lib/greenboot/check/{required.d,wanted.d}
    /etc/greenboot/check/{required.d,wanted.d}
    /etc/recovery/check/{required.d,wanted.d}

A script that exits non-zero in ``required.d`` makes the boot bad; in ``wanted.d`` it is only
reported. When the boot is bad the kernel log of this boot is saved as text in
``/var/lib/recovery/failed-boot.log`` (the one before it kept as ``.1``): the evidence the
recovery environment reads when the failed boots left no crash record (a driver that oopsed
without a panic, a service that did not come up). The unit then reboots the machine without
marking it good, so GRUB counts the boot as failed.

``recovery-agent mark-good`` (:func:`mark_good`, run by ``qmr-mark-good.service`` after
``boot-complete.target``) sets ``boot_count`` and ``recovery_attempts`` to 0 in grubenv, in
place, and sets the failed-boot log aside (``failed-boot.log.old``): it no longer describes the
machine.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..bootenv import BOOT_COUNT, RECOVERY_ATTEMPTS, BootEnv
from .manifest import write_atomic
from .paths import CHECK_DIR, CHECK_KINDS, FAILED_BOOT_LOG, GREENBOOT_CHECK_DIRS, GRUBENV

CHECK_TIMEOUT_S = 300.0
KMSG = Path("/dev/kmsg")

Say = Callable[[str], None]


@dataclass(frozen=True)
class CheckResult:
    kind: str  # "required" or "wanted"
    script: Path
    exit_code: int  # -1: did not finish in time or could not run
    output: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def name(self) -> str:
        return f"{self.kind}.d/{self.script.name}"


def check_scripts(root: Path) -> dict[str, list[Path]]:
    """Every check script, by kind (``required``, ``wanted``), in the order they run."""
    found: dict[str, list[Path]] = {kind.removesuffix(".d"): [] for kind in CHECK_KINDS}
    for base in (*GREENBOOT_CHECK_DIRS, CHECK_DIR):
        for kind in CHECK_KINDS:
            folder = root / base / kind
            if folder.is_dir():
                found[kind.removesuffix(".d")] += sorted(p for p in folder.glob("*.sh") if p.is_file())
    return found


def _run_script(kind: str, script: Path) -> CheckResult:
    shell = "/bin/bash" if Path("/bin/bash").exists() else "/bin/sh"
    try:
        proc = subprocess.run(
            [shell, str(script)],
            capture_output=True,
            timeout=CHECK_TIMEOUT_S,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return CheckResult(kind, script, -1, f"did not finish in {CHECK_TIMEOUT_S:.0f} s")
    except OSError as exc:
        return CheckResult(kind, script, -1, f"could not run: {exc.strerror}")
    text = (proc.stdout + proc.stderr).decode("utf-8", "replace").strip()
    return CheckResult(kind, script, proc.returncode, text)


def read_kernel_log(kmsg: Path = KMSG) -> str:
    """This boot's kernel log as ``dmesg`` prints it (``[  12.345678] text``), read from
    ``/dev/kmsg`` without waiting for more."""
    lines = []
    try:
        fd = os.open(kmsg, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        return f"(no kernel log: cannot open {kmsg}: {exc.strerror})\n"
    try:
        while True:
            try:
                record = os.read(fd, 8192)
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    break
                if exc.errno == errno.EPIPE:  # overwritten while reading: go on
                    continue
                raise
            if not record:
                break
            header, _, message = record.decode("utf-8", "replace").partition(";")
            fields = header.split(",")
            usec = int(fields[2]) if len(fields) > 2 and fields[2].isdigit() else 0
            text = message.split("\n", 1)[0]  # continuation lines (" KEY=value") are metadata
            lines.append(f"[{usec // 1_000_000:5d}.{usec % 1_000_000:06d}] {text}")
    finally:
        os.close(fd)
    return "\n".join(lines) + "\n"


def save_kernel_log(root: Path, text: str) -> Path:
    """Write ``text`` as the failed-boot log on ``root`` (the previous one becomes ``.1``)."""
    path = root / FAILED_BOOT_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        os.replace(path, path.with_name(path.name + ".1"))
    write_atomic(path, text.encode(), 0o600)
    return path


def run_checks(root: Path, say: Say = print, kmsg: Path = KMSG) -> bool:
    """Run every check; True if every required one passed. On a bad boot, save the kernel
    log (:func:`save_kernel_log`) before returning False."""
    scripts = check_scripts(root)
    results = [_run_script(kind, s) for kind in ("required", "wanted") for s in scripts[kind]]
    for r in results:
        if r.ok:
            say(f"QMR-CHECK ok {r.name}")
        else:
            last = r.output.splitlines()[-1] if r.output else ""
            what = "FAILED" if r.kind == "required" else "failed (wanted, not required)"
            say(f"QMR-CHECK {what} {r.name} (exit {r.exit_code}){': ' + last if last else ''}")
    failed = [r for r in results if r.kind == "required" and not r.ok]
    if not failed:
        say(f"QMR-CHECKS-PASSED {len(results)} checks")
        return True
    log = save_kernel_log(root, read_kernel_log(kmsg))
    say(
        f"QMR-UNHEALTHY required check failed: {', '.join(r.name for r in failed)}; "
        f"kernel log saved in /{log.relative_to(root)}; the machine reboots"
    )
    return False


def mark_good(root: Path, say: Say = print) -> None:
    """The boot is good: ``boot_count`` and ``recovery_attempts`` to 0 in grubenv (in place),
    the failed-boot log set aside."""
    grubenv = root / GRUBENV
    env = BootEnv.read(grubenv)
    env.set(BOOT_COUNT, 0)
    env.set(RECOVERY_ATTEMPTS, 0)
    env.write(grubenv)
    log = root / FAILED_BOOT_LOG
    if log.exists():
        os.replace(log, log.with_name(log.name + ".old"))
    say(f"QMR-HEALTHY boot_count={BootEnv.read(grubenv).boot_count}")
