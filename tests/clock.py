"""A clock the test drives, for the agent's waits (recovery_agent.clock).

Time stands still until the test moves it: an agent that sleeps (between polls, before its
next report) waits until the test calls ``advance`` or ``release``. A test therefore says what
must have happened before the agent may go on (a person approved, the server restarted), and
no machine is too slow for it: the agent's deadline passes only when the test lets time pass.

``release()`` lets time run freely from then on: each sleep moves the clock by its own length
at once, so a deadline minutes away in agent time passes in a few real steps.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta


class ManualClock:
    def __init__(self, wall_start: datetime | None = None) -> None:
        self.t = 0.0
        self.wall_start = wall_start or datetime.now(UTC)
        self.free = False
        self.sleepers = 0
        self._changed = asyncio.Condition()

    def monotonic(self) -> float:
        return self.t

    def now(self) -> datetime:
        return self.wall_start + timedelta(seconds=self.t)

    async def sleep(self, seconds: float) -> None:
        target = self.t + max(0.0, seconds)
        async with self._changed:
            self.sleepers += 1
            self._changed.notify_all()
            try:
                await self._changed.wait_for(lambda: self.free or self.t >= target)
            finally:
                self.sleepers -= 1
            if self.free:
                self.t = max(self.t, target)
        await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        async with self._changed:
            self.t += seconds
            self._changed.notify_all()

    async def release(self) -> None:
        async with self._changed:
            self.free = True
            self._changed.notify_all()

    async def wait_for_sleeper(self, timeout: float = 60.0) -> None:
        """Until the agent is asleep on this clock (it has nothing left to do but wait)."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: self.sleepers > 0), timeout)
