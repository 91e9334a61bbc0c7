"""The guest's serial console: the bytes QEMU writes, as text the lab can wait on.

QEMU writes the console to a file (a ``file`` chardev, ``console.log`` in the run directory).
One task, :class:`ConsoleFollower`, follows that file and feeds every chunk, partial lines
included, to :class:`Console`, which

- keeps the text (``text()``) and the complete lines with the host seconds each was read at
  (``timed_lines()``, for timelines);
- answers ``await console.wait_for(regex, timeout)``, expect-style, with a cursor that walks
  forward through the output;
- calls line hooks (``on_line``) for every complete line, for live progress.

When QEMU goes away the follower drains the file to its end and closes the console with the
reason, which fails the pending waits with it (:class:`~recovery_lab.qemu.errors.QemuExited`).
Reading a file QEMU appends to cannot lose bytes, unlike a pipe or a socket nobody read in
time.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import BootTimeout, QemuExited

log = logging.getLogger(__name__)

CONSOLE_POLL_S = 0.05
_CONSOLE_TAIL_LINES = 25


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
    every byte to a :class:`Console`. What is not read now is read on the next poll, and
    :meth:`stop` drains to the end."""

    def __init__(self, path: Path, console: Console, poll_s: float = CONSOLE_POLL_S) -> None:
        self.path = path
        self.console = console
        self.poll_s = poll_s
        self._file: BinaryIO | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.path.touch(exist_ok=True)
        self._file = open(self.path, "rb")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="console-follower")

    def drain(self) -> None:
        """Feed everything written so far (QEMU's exit calls this at once, so the last lines
        are stamped when QEMU exited, not a poll later)."""
        while self._file is not None:
            chunk = self._file.read(65536)
            if not chunk:
                return
            self.console.feed(chunk)

    async def _run(self) -> None:
        while True:
            self.drain()
            await asyncio.sleep(self.poll_s)

    async def stop(self, reason: BaseException | None = None) -> None:
        """Stop following, drain the file to its end and close the console with ``reason``
        (pending waits fail with it). Safe to call twice."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._file is not None:
            self.drain()
            self._file.close()
            self._file = None
        self.console.close(reason)
