"""Flood limits: how often one device may write.

A device in trouble sends one report per visit to its recovery environment, one result per
directive and one health report per good boot. A broken or hostile one sent 1,139 reports in
15 seconds. Every signed device message (diagnostics, results, health) is therefore counted
against a token bucket of its device and its kind: ``burst`` messages at once, refilled at
``per_minute``. An empty bucket refuses the message with ``TooManyRequests`` (HTTP 429 with
``Retry-After``, which the device client honours within its retry budget).

The bucket is checked once the envelope has verified against the device's enrolled key, so no
one else can spend a device's budget, and a message spends a token only once it was stored: a
replay, a duplicate or a refusal costs nothing. Buckets live in this process's memory, on the
service's clock: each server process behind a load balancer keeps its own, so a device that
reaches N processes may send up to N times as much. That bounds a flood; it is not an exact
quota.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from .errors import TooManyRequests


@dataclass(frozen=True)
class RateLimit:
    """``burst`` messages at once, then ``per_minute`` (per device, per kind of message)."""

    burst: int = 10
    per_minute: float = 1.0


class DeviceRateLimits:
    """Token buckets per (device, kind of message)."""

    def __init__(self, limit: RateLimit, clock: Callable[[], datetime]) -> None:
        self._limit = limit
        self._clock = clock
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # -> (tokens, at)

    def _tokens(self, key: tuple[str, str], now: float) -> float:
        tokens, at = self._buckets.get(key, (float(self._limit.burst), now))
        return min(float(self._limit.burst), tokens + max(0.0, now - at) * self._limit.per_minute / 60)

    def check(self, device_id: str, kind: str) -> None:
        """Raise TooManyRequests unless ``device_id`` may send a message of ``kind`` now."""
        now = self._clock().timestamp()
        tokens = self._tokens((device_id, kind), now)
        if tokens < 1:
            wait = math.ceil((1 - tokens) * 60 / self._limit.per_minute)
            raise TooManyRequests(
                f"device {device_id} sent more {kind} messages than {self._limit.burst} at once and "
                f"{self._limit.per_minute:g} a minute: wait {wait} s (Retry-After)",
                retry_after_s=wait,
            )

    def spend(self, device_id: str, kind: str) -> None:
        """Count a message of ``kind`` that ``device_id`` got stored."""
        now = self._clock().timestamp()
        key = (device_id, kind)
        self._buckets[key] = (self._tokens(key, now) - 1, now)
        if len(self._buckets) > 100_000:  # forget the devices whose bucket refilled
            self._buckets = {
                k: v for k, v in self._buckets.items() if self._tokens(k, now) < self._limit.burst
            }
