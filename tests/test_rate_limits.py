"""Per-device rate limits: a flood of signed messages from one device is stored up to its
budget and answered 429 with Retry-After after that; the device client honours Retry-After
within its retry budget."""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from recovery_agent.protocol.client import (
    MAX_RETRY_AFTER_S,
    DeviceClient,
    RetryPolicy,
    ServerBusy,
    ServerUnreachable,
    retry_after,
)
from recovery_agent.protocol.envelope import seal_bytes
from recovery_agent.protocol.keys import SigningKey
from recovery_agent.protocol.wire import (
    BootState,
    CrashKind,
    CrashSignature,
    Diagnostics,
    Health,
    SystemInfo,
    utcnow,
)
from recovery_server.limits import RateLimit

from .conftest import FAST_RETRY

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Frozen:
    """A fleet with two enrolled devices, its server's clock standing still (``t``)."""

    def __init__(self, fleet) -> None:
        self.fleet = fleet
        self.t = T0
        self.keys: dict[str, SigningKey] = {}

    async def start(self) -> Frozen:
        self.fleet.service.clock = lambda: self.t
        for device_id in ("dev-1", "dev-2"):
            self.keys[device_id] = SigningKey.generate()
            await self.fleet.enroll(device_id, self.keys[device_id])
        return self

    async def restart(self, rate: RateLimit) -> None:
        self.fleet.settings.device_rate = rate
        await self.fleet.restart()
        self.fleet.service.clock = lambda: self.t

    def diagnostics(self, device_id: str) -> bytes:
        d = Diagnostics(
            device_id=device_id,
            server_nonce=self.fleet.service.challenge(device_id).nonce,
            agent_nonce=secrets.token_urlsafe(24),
            created_at=utcnow(),
            agent_version="t",
            boot=BootState(boot_count=2, boot_limit=2),
            crash=CrashSignature(kind=CrashKind.KERNEL_PANIC, title="general protection fault in f"),
            system=SystemInfo(),
        )
        return seal_bytes(d, self.keys[device_id])

    async def post(self, path: str, body: bytes) -> tuple[int, dict, str | None]:
        async with aiohttp.ClientSession() as s:
            async with s.post(self.fleet.url + path, data=body) as r:
                return r.status, await r.json(), r.headers.get("Retry-After")

    async def report(self, device_id: str) -> tuple[int, dict, str | None]:
        return await self.post("/v1/diagnostics", self.diagnostics(device_id))

    async def health(self, device_id: str, boot_id: str) -> int:
        health = Health(device_id=device_id, boot_id=boot_id, created_at=utcnow())
        return (await self.post("/v1/health", seal_bytes(health, self.keys[device_id])))[0]


@pytest.fixture
async def frozen(fleet) -> Frozen:
    return await Frozen(fleet).start()


async def test_a_flood_of_diagnostics_is_stored_up_to_the_devices_budget(frozen):
    """The audit's flood: one device sending report after report (1,139 in 15 s)."""
    rate = frozen.fleet.settings.device_rate
    answers = [await frozen.report("dev-1") for _ in range(50)]
    assert [a[0] for a in answers] == [200] * rate.burst + [429] * (50 - rate.burst)
    status, body, after = answers[-1]
    assert body["code"] == "too_many_requests" and "device dev-1" in body["error"]
    assert after == str(int(60 / rate.per_minute))
    assert frozen.fleet.count("reports") == rate.burst
    # Another device, and another kind of message of the same device, have their own budget.
    assert (await frozen.report("dev-2"))[0] == 200
    assert await frozen.health("dev-1", "b-1") == 200
    # Time refills the bucket: one message a minute.
    frozen.t = T0 + timedelta(seconds=60)
    assert [(await frozen.report("dev-1"))[0] for _ in range(2)] == [200, 429]
    assert frozen.fleet.count("reports") == rate.burst + 2


async def test_refused_replayed_and_duplicate_messages_cost_no_budget(frozen):
    raw = frozen.diagnostics("dev-1")
    assert (await frozen.post("/v1/diagnostics", raw))[0] == 200
    for _ in range(30):  # replays: refused (409), not counted
        assert (await frozen.post("/v1/diagnostics", raw))[0] == 409
    for _ in range(30):  # the same boot again: a duplicate, not counted
        assert await frozen.health("dev-1", "b-1") == 200
    burst = frozen.fleet.settings.device_rate.burst
    assert [(await frozen.report("dev-1"))[0] for _ in range(burst)] == [200] * (burst - 1) + [429]


async def test_the_device_client_gives_up_at_once_when_asked_to_wait_past_its_budget(frozen):
    await frozen.restart(RateLimit(burst=1, per_minute=1))
    assert (await frozen.report("dev-1"))[0] == 200
    async with DeviceClient(frozen.fleet.url, retry=FAST_RETRY) as c:
        with pytest.raises(ServerBusy, match="asks to wait 60 s") as e:
            await c.send_diagnostics(frozen.diagnostics("dev-1"))
    assert e.value.retry_after_s == 60 and isinstance(e.value, ServerUnreachable)


# ---------------------------------------------------------------- the client alone


@pytest.fixture
async def busy_server():
    """Answers each request with the next (status, Retry-After) in ``plan``, then 200 {}."""
    plan: list[tuple[int, str | None]] = []
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.path)
        if plan:
            status, after = plan.pop(0)
            headers = {"Retry-After": after} if after else {}
            return web.json_response({"error": "busy", "code": "busy"}, status=status, headers=headers)
        return web.json_response({"status": "recorded"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app)
    await server.start_server()
    yield server, plan, seen
    await server.close()


async def test_the_client_waits_as_long_as_retry_after_says(busy_server):
    server, plan, seen = busy_server
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    policy = RetryPolicy(attempts=5, max_delay_s=120, backoff_max_s=0.01, backoff_multiplier_s=0.001)
    url = str(server.make_url("/"))
    plan += [(429, "7"), (503, "3"), (429, None)]
    async with DeviceClient(url, retry=policy, sleep=sleep) as c:
        assert await c.send_health(b"{}") == {"status": "recorded"}
    assert len(seen) == 4
    assert slept[0] >= 7 and slept[1] >= 3 and slept[2] <= 0.01
    slept.clear()
    seen.clear()
    plan += [(429, "600")]
    async with DeviceClient(url, retry=policy, sleep=sleep) as c:
        with pytest.raises(ServerBusy, match="asks to wait 600 s"):
            await c.send_health(b"{}")
    assert len(seen) == 1 and slept == [], "no knocking again before the server said"


def test_retry_after_reads_seconds_and_dates_and_ignores_junk():
    assert retry_after("120") == 120
    assert retry_after(None) == retry_after("") == retry_after("soon") == retry_after("-5") == 0
    assert retry_after("¹") == retry_after("٣") == 0  # digits to str.isdigit, not seconds
    assert retry_after("99999999") == MAX_RETRY_AFTER_S
    assert retry_after("Wed, 21 Oct 2099 07:28:00 GMT") == MAX_RETRY_AFTER_S
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0
    assert json.dumps(retry_after("1"))


def test_serve_takes_the_device_budget_from_its_flags(tmp_path, monkeypatch):
    """An operator sets the flood limits on `recovery-server serve`; the defaults are
    RateLimit's."""
    from recovery_server import cli

    seen = []

    class Stop(Exception):
        pass

    def capture(args, settings=None):
        seen.append(settings.device_rate)
        raise Stop

    monkeypatch.setattr(cli, "open_service", capture)
    data = ["--data", str(tmp_path)]
    with pytest.raises(Stop):
        cli.main([*data, "serve", "--device-burst", "3", "--device-rate", "0.5"])
    with pytest.raises(Stop):
        cli.main([*data, "serve"])
    assert seen == [RateLimit(burst=3, per_minute=0.5), RateLimit()]
    with pytest.raises(SystemExit):
        cli.main([*data, "serve", "--device-rate", "0"])


async def test_a_duplicate_health_report_that_rewrites_the_inventory_costs_budget(frozen):
    from recovery_agent.protocol.wire import FileRecord, InventoryUpdate, inventory_digest

    burst = frozen.fleet.settings.device_rate.burst
    statuses = []
    for i in range(burst + 2):  # the same boot each time, a new inventory each time
        rec = FileRecord(path=f"var/lib/sensor/channels/C-{i}.sys", size=1, mtime=0, sha256=f"{i:064x}")
        inventory = InventoryUpdate(digest=inventory_digest([(rec.path, rec.sha256)]), files=[rec])
        health = Health(device_id="dev-1", boot_id="b-1", created_at=utcnow(), inventory=inventory)
        statuses.append((await frozen.post("/v1/health", seal_bytes(health, frozen.keys["dev-1"])))[0])
    assert statuses == [200] * burst + [429] * 2
