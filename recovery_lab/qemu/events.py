"""QMP events: every event of a run, in order, and waiting for one.

QEMU tells what happens to the machine as QMP events: ``RESET`` (a reboot), ``GUEST_PANICKED``
(pvpanic), ``WATCHDOG``, ``SHUTDOWN`` with its reason, ``STOP``/``RESUME``. The process layer
pumps each one into :class:`EventLog` as it arrives, which

- stamps it with host seconds since the VM started (:class:`QemuEvent`; QEMU's own timestamp
  is kept too) and appends it to ``events.jsonl`` in the run directory;
- answers ``await events.wait("RESET", timeout)``, expect-style: a cursor walks forward, so
  successive waits see successive events; ``since=0`` searches them all;
- is closed when QEMU exits, which fails pending waits with
  :class:`~recovery_lab.qemu.errors.QemuExited`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BootTimeout, QemuExited


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

    def record(self, msg: Mapping[str, Any], now: float | None = None) -> QemuEvent:
        """Add the QMP event message ``msg`` (``{"event": ..., "data": ..., "timestamp": ...}``)
        and wake the waits it satisfies."""
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
        """No more events: pending and later waits fail with ``reason``."""
        self._closed = reason
        for w in self._waiters:
            if not w.future.done():
                w.future.set_exception(reason)
        self._waiters.clear()

    def named(self, name: str) -> list[QemuEvent]:
        """Every event called ``name`` so far."""
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
        """The next event named ``name`` (any, if None) for which ``predicate`` holds, at or
        after the cursor (or index ``since``); the cursor moves past it. Raises
        :class:`~recovery_lab.qemu.errors.BootTimeout` or
        :class:`~recovery_lab.qemu.errors.QemuExited`, each with ``console_tail()``."""
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
