"""The machine QEMU emulates: what it boots, its disks and its devices.

This module owns the description of a lab machine (:class:`MachineConfig`, :class:`Drive`),
the part of QEMU's command line that builds that machine (:func:`machine_args`) and the
disks of one run (:func:`prepare_disks`): a disk is never written by a run; it gets a qcow2
overlay in the run directory (``qemu-img create -f qcow2 -b BASE -F raw``) and the guest
writes there. How QEMU is started and watched is :mod:`recovery_lab.qemu.process`'s.

Device choices (QEMU 7.2, measured):

- In-guest reboots (``panic=5``, ``reboot -f``, the watchdog) reset the VM and QEMU keeps
  running (``-action reboot=reset``, QEMU's default): one QEMU process follows a machine
  through its whole boot loop. A guest power-off ends QEMU (``SHUTDOWN`` ``guest-shutdown``).
- ``-device pvpanic`` with ``-action panic=none``: a guest panic (once the guest has loaded
  ``pvpanic-mmio``) emits ``GUEST_PANICKED`` with action ``run`` and nothing else, so the
  guest's own ``panic=5`` reboot still happens as on real hardware. QEMU 7.2's default,
  ``panic=shutdown``, would power the machine off instead; it has no ``panic=reset``.
- ``-device i6300esb`` with ``-action watchdog=reset``: an expired watchdog emits ``WATCHDOG``
  (action ``reset``) and then ``RESET``.
- ``-accel tcg`` by default: ``/dev/kvm`` is not usable on the lab machines. ``accel="kvm"``
  is an option, never the default.
- The network, when there is one, is user mode with ``restrict=on`` and one ``guestfwd``: the
  guest's 10.0.2.100:PORT reaches 127.0.0.1:PORT on the host and nothing else. Its netdev id
  is :data:`NETDEV` (what ``QemuVM.set_link`` unplugs). The forward is ``-cmd:``, not
  ``-tcp:``: libslirp starts :mod:`~recovery_lab.qemu.forwarder` for every connection the
  guest opens, and it opens its own connection to the host port (:func:`forward_command`).
  A ``-tcp:`` forward is one connection made when QEMU starts and never made again: after a
  server restart or a connection the server closed the guest could not reach the host again.
- ``firmware="uefi"``: OVMF (Debian's ``ovmf``) as two pflash drives, the firmware read-only
  and its variable store (:data:`EFI_VARS`, a copy of OVMF's empty store made once in the run
  directory) writable. Guest reboots keep the variables, as NVRAM does: the kernel's
  ``efi_pstore`` keeps a panic's log there for the next boot.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .. import tools
from .errors import QemuError

# The ramoops region the lab's kernels use (memmap=1M$0x7f00000) must be RAM.
MIN_MEMORY_MB = 256
NETDEV = "n0"
# The boot disk's overlay in the run directory.
DISK_OVERLAY = "disk.qcow2"
# UEFI: OVMF's firmware and its empty variable store (Debian's ovmf package, 4 MiB builds).
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
FIRMWARES = ("bios", "uefi")
# The machine's UEFI variables in the run directory (kept across the guest's reboots).
EFI_VARS = "efivars.fd"
# What libslirp runs for each guest connection to the forwarded address.
FORWARDER = Path(__file__).with_name("forwarder.py")


class MachineConfigError(QemuError):
    """Raised by :meth:`MachineConfig.validate` (so by ``QemuVM.start``) when the machine
    cannot be made: nothing to boot, a disk image, kernel or initrd that does not exist (build
    it with ``recovery-lab build``), or too little memory for ramoops."""


@dataclass(frozen=True)
class Drive:
    """An extra disk (a seed disk, say). ``snapshot=True`` gives it its own qcow2 overlay in the
    run directory so the file is never written; otherwise QEMU opens it as is."""

    path: Path
    format: str = "raw"
    interface: str = "virtio"
    readonly: bool = False
    snapshot: bool = False


@dataclass
class MachineConfig:
    """What to boot and with which devices. Either ``disk`` (boots through its bootloader) or
    ``kernel`` (+ ``initrd``, ``append``) must be given; both may be."""

    disk: Path | None = None
    disk_format: str = "raw"
    disk_interface: str = "virtio"
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    extra_drives: list[Drive] = field(default_factory=list)
    memory_mb: int = 512
    smp: int = 1
    accel: str = "tcg"
    pvpanic: bool = True
    watchdog: bool = True
    # guestfwd: the guest's forward_guest_ip:PORT reaches 127.0.0.1:PORT on the host, nothing
    # else; one host connection per guest connection (forward_command).
    forward_port: int | None = None
    forward_guest_ip: str = "10.0.2.100"
    # The guest's side of the forward, when it differs from the host's (an image whose
    # settings name a fixed port, http://10.0.2.100:8080).
    forward_guest_port: int | None = None
    extra_args: list[str] = field(default_factory=list)
    # "bios" (SeaBIOS, QEMU's default) or "uefi" (OVMF with its variables in the run directory)
    firmware: str = "bios"

    def validate(self) -> None:
        """Raise :class:`MachineConfigError` if this machine cannot be started."""
        if self.disk is None and self.kernel is None:
            raise MachineConfigError("MachineConfig needs a disk image or a kernel to boot")
        for what, path in (("disk image", self.disk), ("kernel", self.kernel), ("initrd", self.initrd)):
            if path is not None and not Path(path).is_file():
                raise MachineConfigError(f"{what} {path} does not exist: build it first (recovery-lab build)")
        if self.firmware not in FIRMWARES:
            raise MachineConfigError(f"firmware {self.firmware!r}: use one of {', '.join(FIRMWARES)}")
        if self.firmware == "uefi":
            for path in (OVMF_CODE, OVMF_VARS):
                if not path.is_file():
                    raise MachineConfigError(
                        f"UEFI needs OVMF and {path} is not there: apt-get install ovmf "
                        "(scripts/setup.sh --lab installs it)"
                    )
        if self.memory_mb < MIN_MEMORY_MB:
            raise MachineConfigError(
                f"memory_mb={self.memory_mb}: ramoops at 0x7f00000 needs >= {MIN_MEMORY_MB} MB"
            )


@dataclass(frozen=True)
class RunDisks:
    """The files one run's QEMU opens: the boot disk's overlay (if there is a disk), one
    path per extra drive (its overlay, or the file itself), and the UEFI variable store."""

    disk: Path | None
    drives: list[Path]
    efi_vars: Path | None = None


def make_overlay(base: Path, overlay: Path, base_format: str = "raw") -> None:
    """A qcow2 overlay whose backing file is ``base``: the guest writes go to the overlay.
    Raises :class:`~recovery_lab.tools.ToolError` if ``qemu-img`` is missing or fails."""
    tools.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            str(Path(base).resolve()),
            "-F",
            base_format,
            str(overlay),
        ]
    )


def prepare_disks(cfg: MachineConfig, run_dir: Path) -> RunDisks:
    """Make the run's overlays in ``run_dir``: :data:`DISK_OVERLAY` for the boot disk,
    ``drive<N>.qcow2`` for each extra drive with ``snapshot=True``."""
    disk: Path | None = None
    if cfg.disk is not None:
        disk = run_dir / DISK_OVERLAY
        make_overlay(cfg.disk, disk, cfg.disk_format)
    drives = []
    for i, drive in enumerate(cfg.extra_drives, start=1):
        if drive.snapshot:
            overlay = run_dir / f"drive{i}.qcow2"
            make_overlay(drive.path, overlay, drive.format)
            drives.append(overlay)
        else:
            drives.append(Path(drive.path).resolve())
    efi_vars = None
    if cfg.firmware == "uefi":
        efi_vars = run_dir / EFI_VARS
        if not efi_vars.exists():  # a run that boots again keeps the machine's variables
            shutil.copyfile(OVMF_VARS, efi_vars)
    return RunDisks(disk, drives, efi_vars)


def forward_command(port: int, host: str = "127.0.0.1") -> str:
    """The ``guestfwd=...-cmd:`` command that joins one guest connection to ``host:port``:
    this Python, isolated and without site packages (it starts in tens of milliseconds),
    running :mod:`~recovery_lab.qemu.forwarder`. libslirp splits it like a shell would (no
    shell runs); QEMU's option parser needs every comma doubled."""
    command = shlex.join([sys.executable, "-I", "-S", str(FORWARDER), host, str(port)])
    return command.replace(",", ",,")


def machine_args(
    cfg: MachineConfig, disk_path: Path | None, drive_paths: list[Path], efi_vars: Path | None = None
) -> list[str]:
    """The part of QEMU's command line that makes the machine: accelerator, memory, CPUs,
    firmware, devices and their ``-action``s, what to boot, the disks, the network (pure: no
    files are touched)."""
    cmd = ["-accel", cfg.accel, "-m", str(cfg.memory_mb), "-smp", str(cfg.smp)]
    if cfg.firmware == "uefi":
        if efi_vars is None:
            raise MachineConfigError("a UEFI machine needs its variable store (prepare_disks makes it)")
        cmd += [
            "-drive",
            f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive",
            f"if=pflash,format=raw,unit=1,file={efi_vars}",
        ]
    actions = ["reboot=reset", "shutdown=poweroff"]
    if cfg.pvpanic:
        cmd += ["-device", "pvpanic"]
        actions.append("panic=none")
    if cfg.watchdog:
        cmd += ["-device", "i6300esb"]
        actions.append("watchdog=reset")
    cmd += ["-action", ",".join(actions)]
    if cfg.kernel is not None:
        cmd += ["-kernel", str(cfg.kernel)]
        if cfg.initrd is not None:
            cmd += ["-initrd", str(cfg.initrd)]
        if cfg.append is not None:
            cmd += ["-append", cfg.append]
    if disk_path is not None:
        fmt = "qcow2" if disk_path.suffix == ".qcow2" else cfg.disk_format
        cmd += ["-drive", f"file={disk_path},format={fmt},if={cfg.disk_interface},index=0"]
        if cfg.kernel is None:
            cmd += ["-boot", "c"]
    for i, (drive, path) in enumerate(zip(cfg.extra_drives, drive_paths, strict=True), start=1):
        fmt = "qcow2" if drive.snapshot else drive.format
        spec = f"file={path},format={fmt},if={drive.interface},index={i}"
        if drive.readonly:
            spec += ",readonly=on"
        cmd += ["-drive", spec]
    if cfg.forward_port is not None:
        p = cfg.forward_port
        g = cfg.forward_guest_port or p
        cmd += [
            "-netdev",
            f"user,id={NETDEV},restrict=on,guestfwd=tcp:{cfg.forward_guest_ip}:{g}-cmd:{forward_command(p)}",
            "-device",
            f"virtio-net-pci,netdev={NETDEV}",
        ]
    return cmd + cfg.extra_args
