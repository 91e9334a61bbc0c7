"""An encrypted OS disk in the recovery environment: open and mount it with the key the server
released for this visit, and unmount and close it again before the machine reboots.

The recovery environment's init (``recovery-boot.sh``) mounts only ``/boot`` (at ``boot``,
say ``/mnt/boot``, and links ``<os_root>/boot`` to it); the agent maps the LUKS2 volume with
``cryptsetup`` (the key on a pipe: ``luks.open_volume``), wipes its copy of the key, mounts the
filesystem at ``os_root`` and binds ``/boot`` inside it, so that the rest of the loop sees the
OS disk as on a machine without encryption. ``close`` undoes it in the reverse order and says
what it could not undo.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import luks
from .errors import AgentError
from .protocol import sealing

MAPPER = "qmr-os"
TIMEOUT_S = 60


class OsDiskError(AgentError):
    """Raised when the opened OS disk cannot be mounted (the message says what failed)."""


@dataclass(frozen=True)
class EncryptedOs:
    """The OS root's LUKS2 volume and where the recovery environment mounted /boot."""

    volume: Path
    boot: Path
    mapper: str = MAPPER


def _run(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    exe = shutil.which(argv[0]) or shutil.which(argv[0], path="/usr/sbin:/sbin:/usr/bin:/bin")
    if exe is None:
        raise OsDiskError(f"no {argv[0]} in the recovery environment")
    return subprocess.run([exe, *argv[1:]], capture_output=True, timeout=TIMEOUT_S, check=False)


def _must(argv: list[str], what: str) -> None:
    proc = _run(argv)
    if proc.returncode != 0:
        said = (proc.stderr or proc.stdout).decode(errors="replace").strip()
        raise OsDiskError(f"could not {what} (exit {proc.returncode}): {said or 'no message'}")


def open_os(enc: EncryptedOs, key: bytearray, os_root: Path) -> Path:
    """Map the volume with ``key`` (wiped here, whatever happens), mount it at ``os_root`` and
    bind /boot into it; return the mapped device. ``LuksError`` if the key does not open it."""
    try:
        device = luks.open_volume(enc.volume, enc.mapper, key)
    finally:
        sealing.wipe(key)
    try:
        _must(["mount", "-t", "ext4", "-o", "rw", str(device), str(os_root)], f"mount {device} at {os_root}")
        boot_in_os = os_root / "boot"
        if enc.boot.resolve() != boot_in_os.resolve():
            _must(["mount", "-o", "bind", str(enc.boot), str(boot_in_os)], f"bind {enc.boot} at {boot_in_os}")
    except BaseException:
        close_os(enc, os_root)
        raise
    return device


def close_os(enc: EncryptedOs, os_root: Path) -> list[str]:
    """Unmount and close what ``open_os`` opened; what could not be undone, said. /boot stays
    mounted at ``enc.boot`` (the recovery environment's)."""
    problems: list[str] = []
    _run(["sync"])
    for mountpoint in (os_root / "boot", os_root):
        if _is_mounted(mountpoint):
            proc = _run(["umount", str(mountpoint)])
            if proc.returncode != 0:
                said = proc.stderr.decode(errors="replace").strip()
                problems.append(f"could not unmount {mountpoint}: {said}")
    if (Path("/dev/mapper") / enc.mapper).exists():
        try:
            luks.close_volume(enc.mapper)
        except luks.LuksError as exc:
            problems.append(str(exc))
    return problems


def _is_mounted(path: Path) -> bool:
    try:
        mounts = Path("/proc/self/mounts").read_text()
    except OSError:
        return False
    return any(line.split()[1] == str(path) for line in mounts.splitlines() if len(line.split()) > 1)
