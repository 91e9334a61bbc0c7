"""A simulated fleet: thousands of in-process devices against a real ``RecoveryService``.

Each simulated device has its own Ed25519 key and goes through the real protocol: a signed
enrollment, a challenge, signed diagnostics, polls for a directive, which it verifies against
the pinned server key, then a signed result and, when its fix "works", a signed healthy
boot. Only the device itself is simulated: what the fix does to it is a draw against
``failure_rate(wave)``. Used by the rollout tests and ``scripts/bench_fleet.py``.
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from recovery_agent.protocol import envelope
from recovery_agent.protocol.envelope import seal_bytes
from recovery_agent.protocol.keys import SigningKey, public_b64
from recovery_agent.protocol.wire import (
    BootState,
    CrashKind,
    CrashSignature,
    Diagnostics,
    FileRecord,
    Health,
    Result,
    SystemInfo,
    utcnow,
)
from recovery_server.service import RecoveryService

BAD_PATH = "var/lib/sensor/channels/C-00000291-00000000-00000032.sys"
BAD_SHA = "7196ba4e48181a86c3ed8cd1d28e0e6e4ea0d8ab40c8ea2d80c2f0a2e5c4d8a1"
CRASH = CrashSignature(
    kind=CrashKind.KERNEL_PANIC,
    title="general protection fault in sensor_parse_channel",
    guilty_module="sensor",
    guilty_frame="sensor_parse_channel",
    channel_file=BAD_PATH,
)


@dataclass
class SimDevice:
    device_id: str
    key: SigningKey
    report: object = None
    agent_nonce: str = ""
    directive_id: str | None = None
    wave: int | None = None
    done: bool = False


@dataclass
class FleetSim:
    service: RecoveryService
    size: int
    seed: int = 291
    devices: list[SimDevice] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.server_ring = {self.service.server_key.key_id: self.service.server_key.public}

    def _timed(self, name: str, fn: Callable[[], None]) -> None:
        t = time.perf_counter()
        fn()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t

    def enroll_all(self, enrollment_token: str) -> None:
        from recovery_agent.protocol.wire import Enrollment

        def go() -> None:
            for i in range(self.size):
                dev = SimDevice(f"sim-{i:05d}", SigningKey.generate())
                msg = Enrollment(
                    device_id=dev.device_id,
                    public_key=public_b64(dev.key.public),
                    enrollment_token=enrollment_token,
                    created_at=utcnow(),
                )
                self.service.enroll(seal_bytes(msg, dev.key))
                self.devices.append(dev)

        self._timed("enroll", go)

    def crash_all(self) -> None:
        """Every device boots into recovery and reports the channel-file crash."""

        def go() -> None:
            for dev in self.devices:
                self._report(dev)

        self._timed("report", go)

    def _report(self, dev: SimDevice) -> None:
        ch = self.service.challenge(dev.device_id)
        dev.agent_nonce = secrets.token_urlsafe(24)
        d = Diagnostics(
            device_id=dev.device_id,
            server_nonce=ch.nonce,
            agent_nonce=dev.agent_nonce,
            created_at=utcnow(),
            agent_version="sim",
            boot=BootState(boot_count=2, boot_limit=2),
            crash=CRASH,
            system=SystemInfo(),
            channel_files=[FileRecord(path=BAD_PATH, size=172, mtime=0, sha256=BAD_SHA)],
        )
        dev.report = self.service.accept_diagnostics(seal_bytes(d, dev.key))

    def round(self, failure_rate: Callable[[int | None], float]) -> int:
        """Every device still waiting polls once; the served ones apply and report. Returns how
        many devices were served in this round."""
        served = 0
        t = time.perf_counter()
        for dev in self.devices:
            if dev.done:
                continue
            answer = self.service.poll(dev.report.report_id, dev.report.poll_token)
            if answer.status != "directive":
                continue
            v = envelope.open_directive(
                answer.envelope,
                self.server_ring,
                device_id=dev.device_id,
                agent_nonce=dev.agent_nonce,
                diagnostics_sha256=dev.report.diagnostics_sha256,
                now=utcnow(),
            )
            dev.directive_id = v.message.directive_id
            row = self.service.store.one(
                "SELECT wave FROM directives WHERE directive_id = ?", dev.directive_id
            )
            dev.wave = row["wave"]
            dev.done = True
            served += 1
            if self.rng.random() < failure_rate(dev.wave):
                result = Result(
                    device_id=dev.device_id,
                    directive_id=dev.directive_id,
                    outcome="failed",
                    error="simulated failure",
                    created_at=utcnow(),
                )
                self.service.accept_result(seal_bytes(result, dev.key))
            else:
                result = Result(
                    device_id=dev.device_id,
                    directive_id=dev.directive_id,
                    outcome="applied",
                    boot_count_reset=True,
                    created_at=utcnow(),
                )
                self.service.accept_result(seal_bytes(result, dev.key))
                health = Health(
                    device_id=dev.device_id,
                    directive_id=dev.directive_id,
                    boot_id=secrets.token_hex(8),
                    created_at=utcnow(),
                )
                self.service.accept_health(seal_bytes(health, dev.key))
        self.service.tick()
        self.timings["rounds"] = self.timings.get("rounds", 0.0) + time.perf_counter() - t
        return served

    def run(self, failure_rate: Callable[[int | None], float], max_rounds: int = 20) -> int:
        """Rounds until nothing moves; returns the number of rounds."""
        for n in range(1, max_rounds + 1):
            if self.round(failure_rate) == 0 and self.round(failure_rate) == 0:
                return n
        return max_rounds
