"""The agent's sense of time, in one injectable object.

The recovery loop waits by the clock: the retry interval, the time to reboot, a directive's
expiry. All of it goes through a :class:`Clock`, so the loop can be driven by a test's own
clock instead of the machine's (a slow machine then changes nothing but how long a test takes).
``monotonic`` measures waits, ``now`` is the wall clock a directive's expiry is judged against,
``sleep`` waits.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def now(self) -> datetime: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The machine's clocks; what the agent uses outside tests."""

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
