"""A simulated fleet: devices that speak the real protocol to a real recovery server.

Each simulated device has its own Ed25519 key and goes through the real protocol: a signed
enrollment, a challenge, signed diagnostics, polls for a directive, which it verifies against
the pinned server key, then a signed result and, when its fix "works", a signed healthy
boot. Only the device itself is simulated.

- ``FleetSim``: thousands of devices calling a ``RecoveryService`` in process; what the fix
  does to each is a draw against ``failure_rate(wave)``. Used by the rollout tests and
  ``scripts/bench_fleet.py``.
- ``HttpDevice``: one device over HTTP (``DeviceClient``), step by step, for tests that play a
  device, honest or not, against a running server: what a stranger holding only the
  enrollment token can do (``tests/test_enrollment.py``); and, by the thousand, the devices
  of ``scripts/bench_fleet.py`` over HTTP.
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from recovery_agent.protocol import envelope
from recovery_agent.protocol.client import DeviceClient
from recovery_agent.protocol.envelope import seal_bytes
from recovery_agent.protocol.keys import SigningKey, public_b64
from recovery_agent.protocol.wire import (
    BootState,
    CrashKind,
    CrashSignature,
    Diagnostics,
    DiagnosticsReceipt,
    DirectivePoll,
    Enrollment,
    FileRecord,
    Health,
    InventoryUpdate,
    Result,
    SystemInfo,
    inventory_digest,
    utcnow,
)
from recovery_server.service import RecoveryService

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

BAD_PATH = "var/lib/sensor/channels/C-00000291-00000000-00000032.sys"
BAD_SHA = "7196ba4e48181a86c3ed8cd1d28e0e6e4ea0d8ab40c8ea2d80c2f0a2e5c4d8a1"
BAD_FILE = FileRecord(path=BAD_PATH, size=172, mtime=0, sha256=BAD_SHA)
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
    # What it runs (its channel files), if the driver sets it: listed in its crash reports,
    # and sent whole as its inventory with its health reports; and the crash it reports.
    files: list[FileRecord] | None = None
    crash: CrashSignature = CRASH
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
        d = crash_report(dev.device_id, ch.nonce, dev.agent_nonce)
        dev.report = self.service.accept_diagnostics(seal_bytes(d, dev.key))

    def poll_once(self, dev: SimDevice) -> str | None:
        """One poll of ``dev``'s report: the id of the directive served (verified), or None."""
        answer = self.service.poll(dev.report.report_id, dev.report.poll_token)
        return served(answer, self.server_ring, dev.device_id, dev.agent_nonce, dev.report)

    def round(self, failure_rate: Callable[[int | None], float]) -> int:
        """Every device still waiting polls once; the served ones apply and report. Returns how
        many devices were served in this round."""
        served = 0
        t = time.perf_counter()
        for dev in self.devices:
            if dev.done:
                continue
            directive_id = self.poll_once(dev)
            if directive_id is None:
                continue
            dev.directive_id = directive_id
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


def served(
    answer: DirectivePoll,
    ring: dict[str, Ed25519PublicKey],
    device_id: str,
    agent_nonce: str,
    receipt: DiagnosticsReceipt,
) -> str | None:
    """The id of the directive a poll's ``answer`` serves, verified as the agent would, or None
    if it serves none."""
    if answer.status != "directive":
        return None
    return envelope.open_directive(
        answer.envelope,
        ring,
        device_id=device_id,
        agent_nonce=agent_nonce,
        diagnostics_sha256=receipt.diagnostics_sha256,
        now=utcnow(),
    ).message.directive_id


def crash_report(
    device_id: str,
    server_nonce: str,
    agent_nonce: str,
    *,
    crash: CrashSignature = CRASH,
    files: list[FileRecord] | None = None,
) -> Diagnostics:
    """Diagnostics of ``crash`` (by default the channel-file crash, ``CRASH``) listing ``files``
    as the device's channel files (by default the bad file alone)."""
    return Diagnostics(
        device_id=device_id,
        server_nonce=server_nonce,
        agent_nonce=agent_nonce,
        created_at=utcnow(),
        agent_version="sim",
        boot=BootState(boot_count=2, boot_limit=2),
        crash=crash,
        system=SystemInfo(),
        channel_files=[BAD_FILE] if files is None else files,
    )


@dataclass
class HttpDevice:
    """One device that speaks the protocol over HTTP, one step per call, as the agent (and the
    OS's health check) would: whoever drives it decides what it claims. ``server_ring`` is the
    pinned server key it verifies directives with."""

    device_id: str
    client: DeviceClient
    server_ring: dict[str, Ed25519PublicKey]
    key: SigningKey = field(default_factory=SigningKey.generate)
    receipt: DiagnosticsReceipt | None = None
    agent_nonce: str = ""
    directive_id: str | None = None
    # What it runs (its channel files), if the driver sets it: listed in its crash reports,
    # and sent whole as its inventory with its health reports; and the crash it reports.
    files: list[FileRecord] | None = None
    crash: CrashSignature = CRASH

    @property
    def public_key(self) -> str:
        return public_b64(self.key.public)

    async def enroll(self, token: str) -> dict:
        msg = Enrollment(
            device_id=self.device_id, public_key=self.public_key, enrollment_token=token, created_at=utcnow()
        )
        return await self.client.enroll(seal_bytes(msg, self.key))

    async def report(self) -> DiagnosticsReceipt:
        """Boot into recovery and report the channel-file crash."""
        ch = await self.client.challenge(self.device_id)
        self.agent_nonce = secrets.token_urlsafe(24)
        d = crash_report(self.device_id, ch.nonce, self.agent_nonce, crash=self.crash, files=self.files)
        self.receipt = await self.client.send_diagnostics(seal_bytes(d, self.key))
        self.directive_id = None
        return self.receipt

    async def poll(self, wait_s: float = 0) -> str | None:
        """One poll for the last report; the directive's id once one is served (verified)."""
        assert self.receipt is not None, "report first"
        answer = await self.client.poll_directive(self.receipt, wait_s)
        directive_id = served(answer, self.server_ring, self.device_id, self.agent_nonce, self.receipt)
        if directive_id is not None:
            self.directive_id = directive_id
        return directive_id

    async def recover(self) -> None:
        """The fix applied, and the next boot was healthy: a result, then a healthy boot."""
        assert self.directive_id, "poll until served first"
        result = Result(
            device_id=self.device_id,
            directive_id=self.directive_id,
            outcome="applied",
            boot_count_reset=True,
            created_at=utcnow(),
        )
        await self.client.send_result(seal_bytes(result, self.key))
        await self.healthy()

    async def healthy(self) -> dict:
        inventory = None
        if self.files is not None:
            digest = inventory_digest((f.path, f.sha256) for f in self.files)
            inventory = InventoryUpdate(digest=digest, files=self.files)
        health = Health(
            device_id=self.device_id,
            directive_id=self.directive_id,
            boot_id=secrets.token_hex(8),
            created_at=utcnow(),
            inventory=inventory,
        )
        return await self.client.send_health(seal_bytes(health, self.key))

    async def fail(self) -> None:
        """The agent could not apply the fix."""
        assert self.directive_id, "poll until served first"
        result = Result(
            device_id=self.device_id,
            directive_id=self.directive_id,
            outcome="failed",
            error="simulated failure",
            created_at=utcnow(),
        )
        await self.client.send_result(seal_bytes(result, self.key))
