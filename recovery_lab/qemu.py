"""One QEMU process, with its QMP connection and its serial console.

This module owns starting a virtual machine, watching it, poking it and tearing it down; what
to boot and what the run means belong to the callers (``recovery_lab.lab``,
``recovery_lab.timeline``). The workflow:

1. ``QemuVM(MachineConfig(...))``; ``await vm.start()`` (or ``async with``):
   a run directory is made; a disk, if any, gets a qcow2 overlay there
   (``qemu-img create -f qcow2 -b BASE -F raw``) so the base image is never written.
2. Python owns the QMP socket: a ``socketpair`` whose one end QEMU inherits
   (``-chardev socket,id=qmp,fd=N -mon chardev=qmp,mode=control``), so there is no socket path
   to race for and no listening to wait on. QEMU starts paused (``-S``); the event pump and
   the console reader run before ``cont``, so nothing the guest does is missed.
3. The console is a file chardev (``console.log``). One reader task follows the file and feeds
   every chunk, partial lines included, to :class:`Console`, which answers
   ``await vm.console.wait_for(regex, timeout)`` and calls line hooks.
4. Every QMP event is recorded with host seconds since start (:class:`EventLog`, also written to
   ``events.jsonl``); ``await vm.wait_event("RESET", timeout)``.
5. Faults: ``system_reset()`` (power loss), ``set_link(False)`` (cable pulled).
6. ``await vm.stop()``: QMP ``quit``, wait, SIGTERM, wait, SIGKILL, and always reap. An EOF or
   an interrupted ``quit`` counts as success. The run directory (console.log, qemu.stderr,
   events.jsonl, cmdline.txt, the overlay) is kept when the run failed or ``keep=True``;
   otherwise it is removed.

Device choices (QEMU 7.2, measured; see ``docs``/the report in the issue):

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
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import re
import shlex
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient, QMPError

from . import tools

log = logging.getLogger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
QEMU_PACKAGE = "qemu-system-x86"

# Bounds for the phases of a run; every wait in this module has one.
CONNECT_TIMEOUT_S = 30.0
QUIT_TIMEOUT_S = 10.0
TERM_TIMEOUT_S = 5.0
KILL_TIMEOUT_S = 5.0
CONSOLE_POLL_S = 0.05
_STDERR_TAIL_LINES = 20
_CONSOLE_TAIL_LINES = 25


# --------------------------------------------------------------------------- errors


class QemuError(Exception):
    """Base class of the errors this module raises."""


class QemuMissing(QemuError):
    """Raised by :meth:`QemuVM.start` when ``qemu-system-x86_64`` (or ``qemu-img``) is not
    installed; the message names the package and the ``apt-get install`` command."""


class QemuFailedToStart(QemuError):
    """Raised by :meth:`QemuVM.start` when QEMU exits or does not answer QMP before the guest
    runs (a bad option, a missing file, a port nobody listens on for ``guestfwd``). Carries
    the command line and the tail of QEMU's standard error, which says what was wrong."""

    def __init__(self, message: str, cmdline: Sequence[str], stderr_tail: str) -> None:
        self.cmdline = list(cmdline)
        self.stderr_tail = stderr_tail
        text = f"{message}\n  command: {shlex.join(cmdline)}"
        if stderr_tail.strip():
            text += "\n  qemu said:\n" + "\n".join("    " + ln for ln in stderr_tail.splitlines())
        super().__init__(text)


class BootTimeout(QemuError):
    """Raised by :meth:`Console.wait_for` and :meth:`QemuVM.wait_event` when what was awaited
    did not happen in time. The message says what was awaited, for how long, and shows the
    last console lines, which usually tell why (a hang, a panic loop, a wrong boot entry)."""

    def __init__(self, awaited: str, timeout: float, console_tail: Sequence[str]) -> None:
        self.awaited = awaited
        self.timeout = timeout
        self.console_tail = list(console_tail)
        tail = "\n".join("    " + ln for ln in console_tail) or "    (no console output)"
        super().__init__(f"timed out after {timeout:g} s waiting for {awaited}; last console lines:\n{tail}")


class QemuExited(QemuError):
    """Raised by a wait when QEMU exited before what was awaited happened (the guest powered
    off, or QEMU died). ``returncode`` is QEMU's exit status."""

    def __init__(self, awaited: str, returncode: int | None, console_tail: Sequence[str]) -> None:
        self.awaited = awaited
        self.returncode = returncode
        self.console_tail = list(console_tail)
        tail = "\n".join("    " + ln for ln in console_tail) or "    (no console output)"
        super().__init__(
            f"QEMU exited (status {returncode}) while waiting for {awaited}; last console lines:\n{tail}"
        )


# --------------------------------------------------------------------------- configuration


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
    memory_mb: int = 512  # ramoops at 0x7f00000 needs at least 256 MB
    smp: int = 1
    accel: str = "tcg"
    pvpanic: bool = True
    watchdog: bool = True
    # guestfwd: the guest's 10.0.2.100:PORT reaches 127.0.0.1:PORT on the host, nothing else.
    # The host side must already listen, or QEMU refuses to start.
    forward_port: int | None = None
    forward_guest_ip: str = "10.0.2.100"
    extra_args: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.disk is None and self.kernel is None:
            raise ValueError("MachineConfig needs a disk image or a kernel to boot")
        for what, path in (("disk image", self.disk), ("kernel", self.kernel), ("initrd", self.initrd)):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{what} {path} does not exist: build it first (recovery-lab build)")
        if self.memory_mb < 256:
            raise ValueError(f"memory_mb={self.memory_mb}: ramoops at 0x7f00000 needs >= 256 MB")


# --------------------------------------------------------------------------- console


@dataclass(frozen=True)
class ConsoleLine:
    """One complete console line and the host seconds (since VM start) it was read at."""

    seconds: float
    text: str


@dataclass
class _Waiter:
    pattern: re.Pattern[str]
    start: int
    future: asyncio.Future[re.Match[str]]


class Console:
    """The guest's serial console as text, fed chunk by chunk.

    ``feed`` takes raw bytes in whatever pieces they arrive (a line may be split across any
    number of chunks, a UTF-8 character too); every waiter is checked after every chunk.
    ``wait_for`` is expect-style: by default it searches from the end of the previous match
    (the cursor), so successive waits walk forward through the output; ``since=0`` searches
    everything. Complete lines (``\\r`` stripped) go to every ``on_line`` hook.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text: list[str] = []  # chunks; joined lazily
        self._joined = ""
        self._len = 0
        self._partial = ""
        self._lines: list[ConsoleLine] = []
        self._hooks: list[Callable[[str], None]] = []
        self._waiters: list[_Waiter] = []
        self.cursor = 0
        self._closed: BaseException | None = None

    # ---- input

    def feed(self, chunk: bytes) -> None:
        text = self._decoder.decode(chunk)
        if text:
            self._append(text)

    def close(self, reason: BaseException | None = None) -> None:
        """No more input: flush the decoder and the last partial line, fail pending waits
        with ``reason`` (if given)."""
        tail = self._decoder.decode(b"", final=True)
        if tail:
            self._append(tail)
        if self._partial:
            self._emit_line(self._partial)
            self._partial = ""
        self._closed = reason
        if reason is not None:
            for w in self._waiters:
                if not w.future.done():
                    w.future.set_exception(reason)
            self._waiters.clear()

    def _append(self, text: str) -> None:
        self._text.append(text)
        self._len += len(text)
        data = self._partial + text
        *complete, self._partial = data.split("\n")
        for line in complete:
            self._emit_line(line)
        if self._waiters:
            self._check_waiters()

    def _emit_line(self, line: str) -> None:
        line = line.replace("\r", "")
        self._lines.append(ConsoleLine(self.clock(), line))
        for hook in list(self._hooks):
            try:
                hook(line)
            except Exception:  # a broken hook must not stop the console
                log.exception("console line hook %r failed", hook)

    def _check_waiters(self) -> None:
        text = self.text()
        for w in list(self._waiters):
            if w.future.done():
                self._waiters.remove(w)
                continue
            m = w.pattern.search(text, w.start)
            if m:
                self._waiters.remove(w)
                w.future.set_result(m)

    # ---- output

    def text(self) -> str:
        """Everything received so far (CRs kept, as QEMU wrote it)."""
        if len(self._joined) != self._len:
            self._joined = "".join(self._text)
            self._text = [self._joined]
        return self._joined

    def lines(self) -> list[str]:
        """The complete lines so far, without line ends."""
        return [ln.text for ln in self._lines]

    def timed_lines(self) -> list[ConsoleLine]:
        """The complete lines so far with the time each was read (for timelines)."""
        return list(self._lines)

    def tail(self, n: int = _CONSOLE_TAIL_LINES) -> list[str]:
        """The last ``n`` lines, the unfinished one included (for error messages)."""
        lines = [ln.text for ln in self._lines[-n:]]
        if self._partial:
            lines.append(self._partial.replace("\r", ""))
        return lines[-n:]

    def on_line(self, hook: Callable[[str], None]) -> None:
        """Call ``hook(line)`` for every complete line from now on."""
        self._hooks.append(hook)

    async def wait_for(
        self, pattern: str | re.Pattern[str], timeout: float, *, since: int | None = None
    ) -> re.Match[str]:
        """Wait until ``pattern`` matches the console text at or after ``since`` (default: the
        cursor) and return the match; the cursor moves to the match's end. Raises
        :class:`BootTimeout`, or the reason the console closed (e.g. :class:`QemuExited`)."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        start = self.cursor if since is None else since
        m = rx.search(self.text(), start)
        if m is None:
            if self._closed is not None:
                raise self._closed
            fut: asyncio.Future[re.Match[str]] = asyncio.get_running_loop().create_future()
            waiter = _Waiter(rx, start, fut)
            self._waiters.append(waiter)
            try:
                m = await asyncio.wait_for(asyncio.shield(fut), timeout)
            except TimeoutError:
                raise BootTimeout(f"console /{rx.pattern}/", timeout, self.tail()) from None
            except QemuExited as exc:
                raise QemuExited(f"console /{rx.pattern}/", exc.returncode, self.tail()) from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.cursor = m.end()
        return m


class ConsoleFollower:
    """The one task that follows ``console.log`` (written by QEMU's file chardev) and feeds
    every byte to a :class:`Console`. Reading a file QEMU appends to cannot lose bytes: what
    is not read now is read on the next poll, and :meth:`stop` drains to the end."""

    def __init__(self, path: Path, console: Console, poll_s: float = CONSOLE_POLL_S) -> None:
        self.path = path
        self.console = console
        self.poll_s = poll_s
        self._file: Any = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.path.touch(exist_ok=True)
        self._file = open(self.path, "rb")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="console-follower")

    def _drain(self) -> None:
        while True:
            chunk = self._file.read(65536)
            if not chunk:
                return
            self.console.feed(chunk)

    async def _run(self) -> None:
        while True:
            self._drain()
            await asyncio.sleep(self.poll_s)

    async def stop(self, reason: BaseException | None = None) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._file is not None:
            self._drain()
            self._file.close()
            self._file = None
        self.console.close(reason)


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class QemuEvent:
    """One QMP event: its name, its ``data``, host seconds since the VM was started, and
    QEMU's own timestamp (seconds since the epoch)."""

    name: str
    data: dict[str, Any]
    seconds: float
    qemu_time: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "event": self.name,
            "seconds": round(self.seconds, 3),
            "data": self.data,
            "qemu_time": self.qemu_time,
        }


@dataclass
class _EventWaiter:
    name: str | None
    predicate: Callable[[QemuEvent], bool] | None
    start: int
    future: asyncio.Future[QemuEvent]

    def matches(self, ev: QemuEvent) -> bool:
        return (self.name is None or ev.name == self.name) and (self.predicate is None or self.predicate(ev))


class EventLog:
    """Every QMP event of the run, in order; waits with an expect-style cursor."""

    def __init__(self, t0: float, jsonl: Path | None = None) -> None:
        self.t0 = t0
        self.events: list[QemuEvent] = []
        self.cursor = 0
        self._jsonl = jsonl
        self._waiters: list[_EventWaiter] = []
        self._closed: BaseException | None = None

    def record(self, msg: dict[str, Any], now: float | None = None) -> QemuEvent:
        ts = msg.get("timestamp") or {}
        qemu_time = (ts["seconds"] + ts["microseconds"] / 1e6) if "seconds" in ts else None
        ev = QemuEvent(
            name=str(msg["event"]),
            data=dict(msg.get("data") or {}),
            seconds=(now if now is not None else time.monotonic()) - self.t0,
            qemu_time=qemu_time,
        )
        self.events.append(ev)
        if self._jsonl is not None:
            with open(self._jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps(ev.to_json()) + "\n")
        for w in list(self._waiters):
            if not w.future.done() and w.matches(ev):
                self._waiters.remove(w)
                w.future.set_result(ev)
        return ev

    def close(self, reason: BaseException) -> None:
        self._closed = reason
        for w in self._waiters:
            if not w.future.done():
                w.future.set_exception(reason)
        self._waiters.clear()

    def named(self, name: str) -> list[QemuEvent]:
        return [e for e in self.events if e.name == name]

    async def wait(
        self,
        name: str | None,
        timeout: float,
        *,
        predicate: Callable[[QemuEvent], bool] | None = None,
        since: int | None = None,
        console_tail: Callable[[], list[str]] = list,
    ) -> QemuEvent:
        start = self.cursor if since is None else since
        probe = _EventWaiter(name, predicate, start, asyncio.get_running_loop().create_future())
        for i in range(start, len(self.events)):
            if probe.matches(self.events[i]):
                self.cursor = i + 1
                return self.events[i]
        awaited = f"QMP event {name or '(any)'}" + (" matching a predicate" if predicate else "")
        if self._closed is not None:
            raise QemuExited(awaited, getattr(self._closed, "returncode", None), console_tail())
        self._waiters.append(probe)
        try:
            ev = await asyncio.wait_for(asyncio.shield(probe.future), timeout)
        except TimeoutError:
            raise BootTimeout(awaited, timeout, console_tail()) from None
        except QemuExited as exc:
            raise QemuExited(awaited, exc.returncode, console_tail()) from None
        finally:
            if probe in self._waiters:
                self._waiters.remove(probe)
        self.cursor = self.events.index(ev) + 1
        return ev


# --------------------------------------------------------------------------- the VM


def build_command(
    cfg: MachineConfig,
    *,
    qmp_fd: int,
    console_path: Path,
    disk_path: Path | None,
    drive_paths: Sequence[Path],
) -> list[str]:
    """The QEMU command line for ``cfg`` (pure: no files are touched)."""
    cmd = [
        QEMU_BINARY,
        "-S",
        "-nodefaults",
        "-display",
        "none",
        "-accel",
        cfg.accel,
        "-m",
        str(cfg.memory_mb),
        "-smp",
        str(cfg.smp),
        "-chardev",
        f"socket,id=qmp,fd={qmp_fd}",
        "-mon",
        "chardev=qmp,mode=control",
        "-chardev",
        f"file,id=con0,path={console_path}",
        "-serial",
        "chardev:con0",
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
        cmd += [
            "-netdev",
            f"user,id=n0,restrict=on,guestfwd=tcp:{cfg.forward_guest_ip}:{p}-tcp:127.0.0.1:{p}",
            "-device",
            "virtio-net-pci,netdev=n0",
        ]
    cmd += cfg.extra_args
    return cmd


def make_overlay(base: Path, overlay: Path, base_format: str = "raw") -> None:
    """A qcow2 overlay whose backing file is ``base``: the guest writes go to the overlay."""
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


class QemuVM:
    """A QEMU process with its QMP connection (``qmp``), console (``console``) and events
    (``events``). Use ``async with QemuVM(cfg) as vm:`` or ``start()``/``stop()``."""

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
        self._stderr_file: Any = None
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
        return self.run_dir / "disk.qcow2"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def seconds(self) -> float:
        """Host seconds since the VM was started (the clock of events and timelines)."""
        return time.monotonic() - self.t0

    # ---- start

    async def start(self) -> None:
        cfg = self.config
        if tools.which(QEMU_BINARY) is None:
            raise QemuMissing(
                f"{QEMU_BINARY} not found: install {QEMU_PACKAGE} (apt-get install {QEMU_PACKAGE})"
            )
        cfg.validate()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        disk_path: Path | None = None
        try:
            if cfg.disk is not None:
                if tools.which("qemu-img") is None:
                    raise QemuMissing("qemu-img not found: install qemu-utils (apt-get install qemu-utils)")
                make_overlay(cfg.disk, self.overlay_path, cfg.disk_format)
                disk_path = self.overlay_path
            drive_paths = []
            for i, drive in enumerate(cfg.extra_drives, start=1):
                if drive.snapshot:
                    ov = self.run_dir / f"drive{i}.qcow2"
                    make_overlay(drive.path, ov, drive.format)
                    drive_paths.append(ov)
                else:
                    drive_paths.append(Path(drive.path).resolve())
        except tools.ToolError as exc:
            self.failed = True
            raise QemuFailedToStart(f"could not make the disk overlay: {exc}", [], "") from exc

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.cmdline = build_command(
            cfg,
            qmp_fd=theirs.fileno(),
            console_path=self.console_path,
            disk_path=disk_path,
            drive_paths=drive_paths,
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
            ours.close()
            raise QemuMissing(
                f"{QEMU_BINARY} not found: install {QEMU_PACKAGE} (apt-get install {QEMU_PACKAGE})"
            ) from exc
        finally:
            theirs.close()
        log.info("started QEMU pid %d in %s", self._proc.pid, self.run_dir)
        self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="qemu-reaper")

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
        if self._follower is not None and self._follower._file is not None:
            self._follower._drain()  # stamp the last lines now, not after the grace below
        # Let the event pump take what QEMU sent before it died (SHUTDOWN comes first).
        await asyncio.sleep(0.2)
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

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def wait_event(
        self,
        name: str | None,
        timeout: float,
        *,
        predicate: Callable[[QemuEvent], bool] | None = None,
        since: int | None = None,
    ) -> QemuEvent:
        """The next QMP event named ``name`` (any, if None) for which ``predicate`` holds,
        after the cursor (or from index ``since``). Raises :class:`BootTimeout` or
        :class:`QemuExited`."""
        return await self.events.wait(
            name, timeout, predicate=predicate, since=since, console_tail=self.console.tail
        )

    async def wait_exit(self, timeout: float) -> int:
        """Wait for QEMU to exit by itself (the guest powered off); its exit status."""
        assert self._proc is not None and self._reaper is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._reaper), timeout)
        except TimeoutError:
            raise BootTimeout("the guest to power off (QEMU to exit)", timeout, self.console.tail()) from None
        assert self.returncode is not None
        return self.returncode

    async def execute(
        self, cmd: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0
    ) -> object:
        """A QMP command, bounded."""
        return await asyncio.wait_for(self.qmp.execute(cmd, arguments), timeout)

    async def system_reset(self) -> None:
        """Power loss and power on: the guest restarts without shutting down."""
        await self.execute("system_reset")

    async def set_link(self, up: bool, netdev: str = "n0") -> None:
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

    def finish(self, failed: bool | None = None) -> None:
        """Keep the run directory if the run failed or ``keep`` was asked; else remove it."""
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

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        await self.stop()
        self.finish(failed=exc_type is not None)


def qemu_version() -> str:
    """``qemu-system-x86_64 --version``'s first line (for reports and manifests)."""
    if tools.which(QEMU_BINARY) is None:
        raise QemuMissing(f"{QEMU_BINARY} not found: install {QEMU_PACKAGE} (apt-get install {QEMU_PACKAGE})")
    return tools.run([QEMU_BINARY, "--version"]).splitlines()[0]


__all__ = [
    "BootTimeout",
    "Console",
    "ConsoleFollower",
    "ConsoleLine",
    "Drive",
    "EventLog",
    "MachineConfig",
    "QemuEvent",
    "QemuExited",
    "QemuFailedToStart",
    "QemuMissing",
    "QemuVM",
    "build_command",
    "make_overlay",
    "qemu_version",
]
