"""Running a lab machine in QEMU, in layers (as ``qemu.qmp`` itself is layered):

- :mod:`~recovery_lab.qemu.machine`: the machine: what it boots, its disks (each run writes
  to a qcow2 overlay, never the base image) and its devices (pvpanic, the i6300esb watchdog,
  a restricted user-mode network), as QEMU arguments;
- :mod:`~recovery_lab.qemu.process`: the QEMU process: its command line, started paused, QMP
  over a socketpair, faults (``system_reset``, ``set_link``), teardown (``quit``, SIGTERM,
  SIGKILL, always reaped): :class:`QemuVM`;
- :mod:`~recovery_lab.qemu.console`: the serial console, followed from QEMU's file chardev,
  with waits and line hooks;
- :mod:`~recovery_lab.qemu.events`: every QMP event of a run, with waits;
- :mod:`~recovery_lab.qemu.errors`: the root :class:`QemuError` and the errors of waiting
  (:class:`BootTimeout`, :class:`QemuExited`).

What to boot and what the run means belong to the callers (:mod:`recovery_lab.boot`,
:mod:`recovery_lab.timeline`).
"""

from __future__ import annotations

from .console import Console, ConsoleFollower, ConsoleLine
from .errors import BootTimeout, QemuError, QemuExited
from .events import EventLog, QemuEvent
from .machine import Drive, MachineConfig, MachineConfigError
from .process import QemuFailedToStart, QemuMissing, QemuVM, build_command

__all__ = [
    "BootTimeout",
    "Console",
    "ConsoleFollower",
    "ConsoleLine",
    "Drive",
    "EventLog",
    "MachineConfig",
    "MachineConfigError",
    "QemuError",
    "QemuEvent",
    "QemuExited",
    "QemuFailedToStart",
    "QemuMissing",
    "QemuVM",
    "build_command",
]
