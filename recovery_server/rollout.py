"""Staged rollout of an approved remediation: waves, gates, and the automatic halt.

The lesson of July 2024 is that nothing should reach every machine at once. A rollout splits
the devices an incident affects into waves: named canary devices first, then growing
percentages (10 %, then 100 %, say). A directive is served only to a device whose wave has
been reached. Before the next wave opens, a gate must pass: enough devices of the current
wave finished (``min_devices``), enough of them succeeded (``min_success_rate``), and the wave
has soaked for ``soak_s`` seconds. When the failure rate of the current wave passes
``halt_failure_rate`` (once ``halt_min_devices`` finished), the rollout halts by itself;
people can pause, resume or revoke it at any time.

Success means the device later reported a healthy boot after applying the directive. Failure
means the agent could not apply it, or the device crashed again (new diagnostics), or it ran
out of recovery attempts. Everything else is pending.

Wave membership is a pure function of the rollout id and the device id (a sha256 bucket from
0 to 9999), so every server process computes the same waves and a device never moves
between waves. A percentage wave holds the devices whose bucket falls below it, so waves are
cumulative: 10 % then 100 % means the 100 % wave adds the other 90 %.

This module holds the rules as pure functions; ``service.py`` applies them in transactions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from recovery_agent.protocol.wire import DeviceId

BUCKETS = 10_000


class Wave(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    devices: list[DeviceId] = Field(default=[], max_length=1000)
    percent: float | None = Field(default=None, gt=0, le=100)

    @model_validator(mode="after")
    def _one_rule(self) -> Wave:
        if bool(self.devices) == (self.percent is not None):
            raise ValueError(f"wave {self.name!r}: give either devices (a canary list) or percent")
        return self


class RolloutPlan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    waves: list[Wave] = Field(min_length=1, max_length=16)
    min_devices: int = Field(default=1, ge=1)
    min_success_rate: float = Field(default=0.95, ge=0, le=1)
    soak_s: float = Field(default=0, ge=0)
    halt_failure_rate: float = Field(default=0.2, ge=0, le=1)
    halt_min_devices: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _growing(self) -> RolloutPlan:
        last = 0.0
        for w in self.waves:
            if w.percent is not None:
                if w.percent <= last:
                    raise ValueError(f"wave {w.name!r}: percentages must grow ({w.percent} after {last})")
                last = w.percent
        if self.waves[-1].percent != 100:
            raise ValueError("the last wave must be percent 100, or some devices are never reached")
        return self


def bucket(rollout_id: str, device_id: str) -> int:
    digest = hashlib.sha256(f"{rollout_id}\n{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def wave_of(plan: RolloutPlan, rollout_id: str, device_id: str) -> int:
    """The first wave that holds the device (the last wave holds everyone)."""
    b = bucket(rollout_id, device_id)
    for i, w in enumerate(plan.waves):
        if device_id in w.devices or (w.percent is not None and b < w.percent * BUCKETS / 100):
            return i
    return len(plan.waves) - 1


@dataclass(frozen=True)
class WaveCounts:
    served: int = 0
    succeeded: int = 0
    failed: int = 0

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed

    @property
    def pending(self) -> int:
        return self.served - self.finished


@dataclass(frozen=True)
class Decision:
    action: Literal["hold", "promote", "complete", "halt"]
    reason: str


def decide(plan: RolloutPlan, current_wave: int, counts: WaveCounts, soaked_s: float) -> Decision:
    """What an active rollout should do now, from the current wave's counts."""
    if counts.finished >= plan.halt_min_devices and counts.finished:
        failure_rate = counts.failed / counts.finished
        if failure_rate > plan.halt_failure_rate:
            return Decision(
                "halt",
                f"wave {plan.waves[current_wave].name!r}: {counts.failed} of "
                f"{counts.finished} devices failed ({failure_rate:.0%} > "
                f"{plan.halt_failure_rate:.0%})",
            )
    if counts.finished < plan.min_devices:
        return Decision("hold", f"{counts.finished} of {plan.min_devices} devices finished")
    success_rate = counts.succeeded / counts.finished
    if success_rate < plan.min_success_rate:
        return Decision("hold", f"success {success_rate:.0%} < {plan.min_success_rate:.0%}")
    if soaked_s < plan.soak_s:
        return Decision("hold", f"soaking: {soaked_s:.0f} of {plan.soak_s:.0f} s")
    if current_wave + 1 >= len(plan.waves):
        if counts.pending == 0:
            return Decision("complete", "the last wave passed its gate")
        return Decision("hold", f"last wave: {counts.pending} devices pending")
    return Decision(
        "promote", f"gate passed: {counts.succeeded}/{counts.finished} succeeded, soaked {soaked_s:.0f} s"
    )
