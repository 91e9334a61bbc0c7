"""The errors of waiting on a running machine, and the root of the QEMU layer's errors.

Every wait in this package (a console pattern, a QMP event, QEMU's exit) is bounded and ends
in one of two ways besides success: the time ran out (:class:`BootTimeout`) or QEMU went away
first (:class:`QemuExited`). Both carry the last console lines, which usually say why. Errors
of starting QEMU belong to the process layer (:mod:`recovery_lab.qemu.process`), errors of a
machine's description to :mod:`recovery_lab.qemu.machine`.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import LabError


class QemuError(LabError):
    """Base class of the errors the QEMU layer raises; never raised itself."""


def _tail_text(console_tail: Sequence[str]) -> str:
    return "\n".join("    " + ln for ln in console_tail) or "    (no console output)"


class BootTimeout(QemuError):
    """Raised by :meth:`~recovery_lab.qemu.console.Console.wait_for`,
    :meth:`~recovery_lab.qemu.events.EventLog.wait` and the VM's waits built on them when what
    was awaited did not happen in time. The message says what was awaited, for how long, and
    shows the last console lines, which usually tell why (a hang, a panic loop, a wrong boot
    entry)."""

    def __init__(self, awaited: str, timeout: float, console_tail: Sequence[str]) -> None:
        self.awaited = awaited
        self.timeout = timeout
        self.console_tail = list(console_tail)
        super().__init__(
            f"timed out after {timeout:g} s waiting for {awaited}; last console lines:\n"
            f"{_tail_text(console_tail)}"
        )


class QemuExited(QemuError):
    """Raised by the same waits when QEMU exited before what was awaited happened (the guest
    powered off, or QEMU died). ``returncode`` is QEMU's exit status."""

    def __init__(self, awaited: str, returncode: int | None, console_tail: Sequence[str]) -> None:
        self.awaited = awaited
        self.returncode = returncode
        self.console_tail = list(console_tail)
        super().__init__(
            f"QEMU exited (status {returncode}) while waiting for {awaited}; last console lines:\n"
            f"{_tail_text(console_tail)}"
        )
