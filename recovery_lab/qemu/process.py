"""One QEMU process: started paused, spoken to over QMP, always torn down.

This module owns the process: its command line (the plumbing around the machine's own
arguments from :mod:`recovery_lab.qemu.machine`), starting it, the QMP connection, the tasks
that feed the console and the event log, the faults a test injects, and teardown. The
workflow of :class:`QemuVM`:

1. ``QemuVM(MachineConfig(...))``; ``await vm.start()`` (or ``async with``): a run directory
   is made and the machine's disks get their overlays there (``prepare_disks``).
2. Python owns the QMP socket: a ``socketpair`` whose one end QEMU inherits
   (``-chardev socket,id=qmp,fd=N -mon chardev=qmp,mode=control``), so there is no socket path
   to race for and no listening to wait on. QEMU starts paused (``-S``); the event pump and
   the console follower run before ``cont``, so nothing the guest does is missed.
3. ``vm.console`` (:class:`~recovery_lab.qemu.console.Console`) and ``vm.events``
   (:class:`~recovery_lab.qemu.events.EventLog`) fill as the guest runs;
   ``await vm.wait_event("RESET", timeout)``, ``await vm.wait_exit(timeout)``.
4. Faults: ``system_reset()`` (power loss), ``set_link(False)`` (cable pulled).
5. ``await vm.stop()``: QMP ``quit``, wait, SIGTERM, wait, SIGKILL, and always reap. An EOF or
   an interrupted ``quit`` counts as success. ``vm.finish()`` keeps the run directory
   (console.log, qemu.stderr, events.jsonl, cmdline.txt, the overlays) when the run failed or
   ``keep=True``, and removes it otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from qemu.qmp import EventListener, QMPClient, QMPError

from .. import tools
from .console import Console, ConsoleFollower
from .errors import BootTimeout, QemuError, QemuExited
from .events import EventLog, QemuEvent
from .machine import DISK_OVERLAY, NETDEV, MachineConfig, RunDisks, machine_args, prepare_disks

log = logging.getLogger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
QEMU_PACKAGE = "qemu-system-x86"

# Bounds for the phases of a run; every wait in this module has one.
CONNECT_TIMEOUT_S = 30.0
QUIT_TIMEOUT_S = 10.0
TERM_TIMEOUT_S = 5.0
KILL_TIMEOUT_S = 5.0
# After QEMU exited, the event pump may still hold what QEMU sent before (SHUTDOWN first).
EXIT_GRACE_S = 0.2
_STDERR_TAIL_LINES = 20


class QemuMissing(QemuError):
    """Raised by :meth:`QemuVM.start` when ``qemu-system-x86_64`` (or ``qemu-img``, for a
    machine with a disk) is not installed; the message names the package and the
    ``apt-get install`` command."""


class QemuFailedToStart(QemuError):
    """Raised by :meth:`QemuVM.start` when QEMU exits or does not answer QMP before the guest
    runs (a bad option, a missing file), or when the disk overlay cannot be made. Carries the
    command line and the tail of QEMU's standard error, which says what was wrong."""

    def __init__(self, message: str, cmdline: Sequence[str], stderr_tail: str) -> None:
        self.cmdline = list(cmdline)
        self.stderr_tail = stderr_tail
        text = f"{message}\n  command: {shlex.join(cmdline)}"
        if stderr_tail.strip():
            text += "\n  qemu said:\n" + "\n".join("    " + ln for ln in stderr_tail.splitlines())
        super().__init__(text)


def _require_qemu(with_disk: bool) -> None:
    if tools.which(QEMU_BINARY) is None:
        raise QemuMissing(f"{QEMU_BINARY} not found: install {QEMU_PACKAGE} (apt-get install {QEMU_PACKAGE})")
    if with_disk and tools.which("qemu-img") is None:
        raise QemuMissing("qemu-img not found: install qemu-utils (apt-get install qemu-utils)")


def build_command(
    cfg: MachineConfig,
    *,
    qmp_fd: int,
    console_path: Path,
    disk_path: Path | None,
    drive_paths: list[Path],
    efi_vars: Path | None = None,
) -> list[str]:
    """The QEMU command line for ``cfg``: paused, no default devices, no display, QMP on the
    inherited ``qmp_fd``, the serial console into ``console_path``, then the machine (pure:
    no files are touched)."""
    cmd = [
        QEMU_BINARY,
        "-S",
        "-nodefaults",
        "-display",
        "none",
        "-chardev",
        f"socket,id=qmp,fd={qmp_fd}",
        "-mon",
        "chardev=qmp,mode=control",
        "-chardev",
        f"file,id=con0,path={console_path}",
        "-serial",
        "chardev:con0",
    ]
    return cmd + machine_args(cfg, disk_path, drive_paths, efi_vars)


class QemuVM:
    """A QEMU process with its QMP connection (``qmp``), console (``console``) and events
    (``events``). Use ``async with QemuVM(cfg) as vm:`` or ``start()``/``stop()``/``finish()``."""

    def __init__(
        self, config: MachineConfig, *, run_dir: Path | None = None, keep: bool = False, name: str = "qmr"
    ) -> None:
        self.config = config
        self.name = name
        self.keep = keep
        self._own_run_dir = run_dir is None
        self.run_dir = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix=f"{name}-run-"))
        self.t0 = time.monotonic()
        self.console = Console(clock=self.seconds)
        self.events = EventLog(self.t0)
        self.qmp = QMPClient(name)
        self.cmdline: list[str] = []
        self.returncode: int | None = None
        self.failed = False
        self._proc: asyncio.subprocess.Process | None = None
        self._follower: ConsoleFollower | None = None
        self._pump: asyncio.Task[None] | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._listener = EventListener()
        self._stderr_file: BinaryIO | None = None
        self._stopped = False

    # ---- paths

    @property
    def console_path(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def stderr_path(self) -> Path:
        return self.run_dir / "qemu.stderr"

    @property
    def overlay_path(self) -> Path:
        """The boot disk's overlay, where everything the guest wrote to its disk is."""
        return self.run_dir / DISK_OVERLAY

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def seconds(self) -> float:
        """Host seconds since the VM was started (the clock of events and timelines)."""
        return time.monotonic() - self.t0

    # ---- start

    async def start(self) -> None:
        """Start QEMU paused, connect QMP, start the event pump and the console follower, then
        let the guest run. Raises :class:`QemuMissing`, :class:`QemuFailedToStart` or
        :class:`~recovery_lab.qemu.machine.MachineConfigError`."""
        cfg = self.config
        _require_qemu(with_disk=cfg.disk is not None)
        cfg.validate()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            disks = prepare_disks(cfg, self.run_dir)
        except tools.ToolError as exc:
            self.failed = True
            raise QemuFailedToStart(f"could not make the disk overlay: {exc}", [], "") from exc
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await self._spawn(disks, theirs)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        await self._connect(ours)

    async def _spawn(self, disks: RunDisks, theirs: socket.socket) -> None:
        self.cmdline = build_command(
            self.config,
            qmp_fd=theirs.fileno(),
            console_path=self.console_path,
            disk_path=disks.disk,
            drive_paths=disks.drives,
            efi_vars=disks.efi_vars,
        )
        (self.run_dir / "cmdline.txt").write_text(shlex.join(self.cmdline) + "\n")
        self._stderr_file = open(self.stderr_path, "wb")
        self.t0 = time.monotonic()
        self.events = EventLog(self.t0, self.run_dir / "events.jsonl")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.cmdline,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=self._stderr_file,
                stderr=self._stderr_file,
                pass_fds=(theirs.fileno(),),
            )
        except FileNotFoundError as exc:
            raise QemuMissing(
                f"{QEMU_BINARY} not found: install {QEMU_PACKAGE} (apt-get install {QEMU_PACKAGE})"
            ) from exc
        log.info("started QEMU pid %d in %s", self._proc.pid, self.run_dir)
        self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="qemu-reaper")

    async def _connect(self, ours: socket.socket) -> None:
        self.qmp.register_listener(self._listener)
        try:
            await asyncio.wait_for(self.qmp.connect(ours), CONNECT_TIMEOUT_S)
        except (TimeoutError, QMPError, OSError, EOFError) as exc:
            ours.close()
            await self._abort()
            raise QemuFailedToStart(
                f"QEMU did not answer QMP ({type(exc).__name__}: {exc})", self.cmdline, self._stderr_tail()
            ) from exc
        self._pump = asyncio.get_running_loop().create_task(self._pump_events(), name="qmp-events")
        self._follower = ConsoleFollower(self.console_path, self.console)
        self._follower.start()
        try:
            await asyncio.wait_for(self.qmp.execute("cont"), CONNECT_TIMEOUT_S)
        except (TimeoutError, QMPError, OSError, EOFError) as exc:
            await self._abort()
            raise QemuFailedToStart(
                f"QMP cont failed ({type(exc).__name__}: {exc})", self.cmdline, self._stderr_tail()
            ) from exc

    async def _abort(self) -> None:
        self.failed = True
        await self.stop()

    async def _pump_events(self) -> None:
        async for msg in self._listener:
            ev = self.events.record(msg)
            log.debug("QMP event at %.2f s: %s %s", ev.seconds, ev.name, ev.data)

    async def _reap(self) -> None:
        assert self._proc is not None
        self.returncode = await self._proc.wait()
        log.info("QEMU exited with status %s", self.returncode)
        if self._follower is not None:
            self._follower.drain()  # stamp the last lines now, not after the grace below
        await asyncio.sleep(EXIT_GRACE_S)
        exited = QemuExited("QEMU to keep running", self.returncode, [])
        self.events.close(exited)
        if self._follower is not None:
            await self._follower.stop(exited)

    def _stderr_tail(self) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-_STDERR_TAIL_LINES:])

    # ---- use

    async def wait_event(
        self,
        name: str | None,
        timeout: float,
        *,
        predicate: Callable[[QemuEvent], bool] | None = None,
        since: int | None = None,
    ) -> QemuEvent:
        """The next QMP event named ``name`` (any, if None) for which ``predicate`` holds,
        after the cursor (or from index ``since``). Raises
        :class:`~recovery_lab.qemu.errors.BootTimeout` or
        :class:`~recovery_lab.qemu.errors.QemuExited`."""
        return await self.events.wait(
            name, timeout, predicate=predicate, since=since, console_tail=self.console.tail
        )

    async def wait_exit(self, timeout: float) -> int:
        """Wait for QEMU to exit by itself (the guest powered off); its exit status. Raises
        :class:`~recovery_lab.qemu.errors.BootTimeout`."""
        assert self._proc is not None and self._reaper is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._reaper), timeout)
        except TimeoutError:
            raise BootTimeout("the guest to power off (QEMU to exit)", timeout, self.console.tail()) from None
        assert self.returncode is not None
        return self.returncode

    async def execute(
        self, cmd: str, arguments: dict[str, object] | None = None, timeout: float = 10.0
    ) -> object:
        """A QMP command, bounded."""
        return await asyncio.wait_for(self.qmp.execute(cmd, arguments), timeout)

    async def system_reset(self) -> None:
        """Power loss and power on: the guest restarts without shutting down."""
        await self.execute("system_reset")

    async def set_link(self, up: bool, netdev: str = NETDEV) -> None:
        """Plug (``up=True``) or pull the guest's network cable."""
        await self.execute("set_link", {"name": netdev, "up": up})

    # ---- teardown

    async def stop(self) -> int | None:
        """Stop QEMU (``quit``, SIGTERM, SIGKILL, each bounded), reap it, and close QMP and
        the console. Safe to call twice. Returns QEMU's exit status."""
        if self._stopped:
            return self.returncode
        self._stopped = True
        proc = self._proc
        if proc is not None and proc.returncode is None and self.qmp.runstate.name == "RUNNING":
            try:
                await asyncio.wait_for(self.qmp.execute("quit"), QUIT_TIMEOUT_S)
            except (TimeoutError, QMPError, OSError, EOFError) as exc:
                # ExecInterruptedError/EOF: QEMU hung up while answering; that is a quit.
                log.debug("quit: %s: %s", type(exc).__name__, exc)
        if proc is not None:
            await self._escalate(proc)
        if self._reaper is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._reaper, 5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.qmp.disconnect(), 5)
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump
        if self._follower is not None:
            await self._follower.stop(QemuExited("QEMU to keep running", self.returncode, []))
        if self._stderr_file is not None:
            self._stderr_file.close()
            self._stderr_file = None
        return self.returncode

    async def _escalate(self, proc: asyncio.subprocess.Process) -> None:
        """Wait for the exit ``quit`` asked for, then SIGTERM, then SIGKILL, each bounded."""
        for sig, wait_s in (
            (None, QUIT_TIMEOUT_S),
            (signal.SIGTERM, TERM_TIMEOUT_S),
            (signal.SIGKILL, KILL_TIMEOUT_S),
        ):
            if proc.returncode is not None:
                break
            if sig is not None:
                log.warning("QEMU pid %d still running, sending %s", proc.pid, sig.name)
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), wait_s)
        self.returncode = proc.returncode

    def finish(self, failed: bool | None = None) -> None:
        """Keep the run directory if the run failed or ``keep`` was asked; else remove it (or,
        for a run directory the caller gave, only the overlays in it)."""
        if failed:
            self.failed = True
        if self.failed or self.keep:
            log.info("run directory kept: %s", self.run_dir)
            return
        if self._own_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        else:
            for p in self.run_dir.glob("*.qcow2"):
                p.unlink(missing_ok=True)

    async def __aenter__(self) -> QemuVM:
        try:
            await self.start()
        except BaseException:
            self.finish(failed=True)
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
        self.finish(failed=exc_type is not None)
