"""Two recovery-server processes behind one PostgreSQL: devices talk to either, even to both
at once, and the rollout stays consistent: no report gets two directives, and no directive
reaches a wave before that wave was opened."""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import sys
from pathlib import Path

import pytest

from recovery_agent.protocol.admin import AdminClient
from recovery_agent.protocol.client import DeviceClient, RetryPolicy
from recovery_agent.protocol.envelope import seal_bytes
from recovery_agent.protocol.keys import SigningKey, public_b64
from recovery_agent.protocol.wire import (
    BootState,
    Diagnostics,
    Enrollment,
    FileRecord,
    Health,
    Result,
    SystemInfo,
    utcnow,
)
from recovery_server.portfile import ServerDidNotStart, wait_for_port_file
from recovery_server.store import Store

from .conftest import postgres_schema
from .fleetsim import BAD_PATH, BAD_SHA, CRASH
from .fleetsim import served as served_directive

RETRY = RetryPolicy(attempts=4, max_delay_s=10, backoff_max_s=0.5, backoff_multiplier_s=0.05)
BIN = Path(sys.executable).parent


@pytest.fixture
def pg_url():
    with postgres_schema() as url:
        yield url


async def _cli(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def _serve(data: Path, url: str, name: str) -> tuple[asyncio.subprocess.Process, str]:
    port_file = data / f"{name}.port"
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "recovery-server"),
        "--data",
        str(data),
        "--database",
        url,
        "serve",
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--quiet",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=open(data / f"{name}.log", "w"),
    )
    try:
        port = await asyncio.to_thread(wait_for_port_file, port_file, lambda: proc.returncode is None)
    except ServerDidNotStart:
        raise AssertionError((data / f"{name}.log").read_text()) from None
    return proc, f"http://127.0.0.1:{port}"


@pytest.mark.timeout(300)
async def test_two_servers_one_database_consistent_rollout(pg_url, tmp_path):
    data = tmp_path / "server"
    await _cli(
        str(BIN / "recovery-server"),
        "--data",
        str(data),
        "--database",
        pg_url,
        "init",
        "--token-file",
        str(tmp_path / "admin.token"),
    )
    procs = [await _serve(data, pg_url, "a"), await _serve(data, pg_url, "b")]
    urls = [u for _, u in procs]
    server_key = SigningKey.load(data / "server.key")
    ring = {server_key.key_id: server_key.public}
    rng = random.Random(7)
    try:
        admin = (tmp_path / "admin.token").read_text().strip()
        async with (
            DeviceClient(urls[0], retry=RETRY) as a,
            DeviceClient(urls[1], retry=RETRY) as b,
            AdminClient(urls[0], retry=RETRY) as admin_a,
            AdminClient(urls[1], retry=RETRY) as admin_b,
        ):
            clients = [a, b]
            enroll_token = (
                await admin_a.call("POST", "/enrollment-tokens", token=admin, body={"label": "t"})
            )["token"]
            ops = (
                await admin_b.call("POST", "/users", token=admin, body={"name": "oscar", "role": "operator"})
            )["token"]
            appr = (
                await admin_a.call("POST", "/users", token=admin, body={"name": "bea", "role": "approver"})
            )["token"]

            devices = [(f"pg-{i:03d}", SigningKey.generate()) for i in range(120)]

            async def report(i: int, device_id: str, key: SigningKey):
                c = clients[i % 2]
                await c.enroll(
                    seal_bytes(
                        Enrollment(
                            device_id=device_id,
                            public_key=public_b64(key.public),
                            enrollment_token=enroll_token,
                            created_at=utcnow(),
                        ),
                        key,
                    )
                )
                ch = await clients[(i + 1) % 2].challenge(device_id)
                nonce = secrets.token_urlsafe(24)
                d = Diagnostics(
                    device_id=device_id,
                    server_nonce=ch.nonce,
                    agent_nonce=nonce,
                    created_at=utcnow(),
                    agent_version="t",
                    boot=BootState(boot_count=2, boot_limit=2),
                    crash=CRASH,
                    system=SystemInfo(),
                    channel_files=[FileRecord(path=BAD_PATH, size=172, mtime=0, sha256=BAD_SHA)],
                )
                return device_id, key, nonce, await c.send_diagnostics(seal_bytes(d, key))

            reports = await asyncio.gather(*(report(i, d, k) for i, (d, k) in enumerate(devices)))
            incident = reports[0][3].incident_id
            rem = await admin_a.call(
                "POST",
                "/remediations",
                token=ops,
                body={
                    "title": "q",
                    "incident_id": incident,
                    "actions": [{"type": "quarantine_file", "path": BAD_PATH, "sha256": BAD_SHA}],
                },
            )
            await admin_b.call(
                "POST",
                f"/remediations/{rem['remediation_id']}/rollout",
                token=ops,
                body={
                    "waves": [
                        {"name": "canary", "devices": [d for d, _ in devices[:10]]},
                        {"name": "30%", "percent": 30},
                        {"name": "100%", "percent": 100},
                    ],
                    "min_devices": 10,
                    "min_success_rate": 0.8,
                    "halt_failure_rate": 0.5,
                    "halt_min_devices": 10,
                },
            )
            await admin_a.call("POST", f"/remediations/{rem['remediation_id']}/approve", token=appr)

            served: dict[str, str] = {}

            async def device_loop(device_id, key, nonce, receipt):
                while True:  # until served; the test's timeout bounds it
                    # Ask both servers at once: they must agree on one directive.
                    answers = await asyncio.gather(*(c.poll_directive(receipt, wait_s=0.5) for c in clients))
                    got = [x for x in answers if x.status == "directive"]
                    if got:
                        ids = {served_directive(x, ring, device_id, nonce, receipt) for x in got}
                        assert len(ids) == 1, f"{device_id} got two directives: {ids}"
                        did = ids.pop()
                        served[device_id] = did
                        c = rng.choice(clients)
                        await c.send_result(
                            seal_bytes(
                                Result(
                                    device_id=device_id,
                                    directive_id=did,
                                    outcome="applied",
                                    created_at=utcnow(),
                                ),
                                key,
                            )
                        )
                        await rng.choice(clients).send_health(
                            seal_bytes(
                                Health(
                                    device_id=device_id,
                                    directive_id=did,
                                    boot_id=secrets.token_hex(4),
                                    created_at=utcnow(),
                                ),
                                key,
                            )
                        )
                        return
                    await asyncio.sleep(0.2)

            await asyncio.gather(*(device_loop(*r[:3], r[3]) for r in reports))
            rollouts = await admin_a.call("GET", "/rollouts", token=admin)
    finally:
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            await asyncio.wait_for(proc.wait(), 20)

    assert len(served) == len(devices), "every device was served in the end"
    assert rollouts[0]["state"] in ("completed", "active")
    store = Store(pg_url)
    try:
        assert store.one("SELECT count(*) FROM directives")[0] == len(devices)
        # No overshoot: every directive to wave w > 0 was issued after the promotion to w.
        promoted_at: dict[int, int] = {}
        for e in store.all("SELECT seq, kind, detail FROM events ORDER BY seq"):
            detail = json.loads(e["detail"]) if e["detail"].startswith("{") else {}
            if e["kind"] == "rollout.promoted":
                wave = {"30%": 1, "100%": 2}[detail["to_wave"]]
                promoted_at[wave] = e["seq"]
            if e["kind"] == "directive.issued" and detail["wave"]:
                assert detail["wave"] in promoted_at and promoted_at[detail["wave"]] < e["seq"], e
        assert set(promoted_at) == {1, 2}
    finally:
        store.close()


@pytest.mark.timeout(300)
async def test_an_approval_in_one_process_answers_a_long_poll_waiting_in_the_other(pg_url, tmp_path):
    """The change feed reads the shared audit log: a poll waiting in server b is answered by
    an approval made through server a, long before the poll's own wait runs out."""
    data = tmp_path / "server"
    await _cli(str(BIN / "recovery-server"), "--data", str(data), "--database", pg_url, "init",
               "--token-file", str(tmp_path / "admin.token"))  # fmt: skip
    procs = [await _serve(data, pg_url, "a"), await _serve(data, pg_url, "b")]
    (_, url_a), (_, url_b) = procs
    try:
        admin = (tmp_path / "admin.token").read_text().strip()
        async with (
            DeviceClient(url_a, retry=RETRY) as a,
            DeviceClient(url_b, retry=RETRY) as b,
            AdminClient(url_a, retry=RETRY) as admin_a,
        ):
            enroll = (await admin_a.call("POST", "/enrollment-tokens", token=admin, body={"label": "t"}))[
                "token"
            ]
            people = {}
            for name, role in (("oscar", "operator"), ("bea", "approver")):
                body = {"name": name, "role": role}
                people[name] = (await admin_a.call("POST", "/users", token=admin, body=body))["token"]
            key = SigningKey.generate()
            enrollment = Enrollment(
                device_id="pg-wait",
                public_key=public_b64(key.public),
                enrollment_token=enroll,
                created_at=utcnow(),
            )
            await a.enroll(seal_bytes(enrollment, key))
            d = Diagnostics(
                device_id="pg-wait",
                server_nonce=(await a.challenge("pg-wait")).nonce,
                agent_nonce=secrets.token_urlsafe(24),
                created_at=utcnow(),
                agent_version="t",
                boot=BootState(boot_count=2, boot_limit=2),
                crash=CRASH,
                system=SystemInfo(),
                channel_files=[FileRecord(path=BAD_PATH, size=172, mtime=0, sha256=BAD_SHA)],
            )
            receipt = await a.send_diagnostics(seal_bytes(d, key))
            rem = await admin_a.call(
                "POST",
                "/remediations",
                token=people["oscar"],
                body={
                    "title": "q",
                    "incident_id": receipt.incident_id,
                    "actions": [{"type": "quarantine_file", "path": BAD_PATH, "sha256": BAD_SHA}],
                },
            )
            waiting = asyncio.create_task(b.poll_directive(receipt, wait_s=60))
            first = await b.poll_directive(receipt, wait_s=0)
            assert first.status == "pending" and not waiting.done()
            await admin_a.call("POST", f"/remediations/{rem['remediation_id']}/approve", token=people["bea"])
            answer = await asyncio.wait_for(waiting, 50)
            assert answer.status == "directive"
    finally:
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            await asyncio.wait_for(proc.wait(), 20)


async def test_another_processs_approval_wakes_a_poll_through_listen_notify(tmp_path):
    """With the feed's periodic read off (a tick of an hour), only PostgreSQL's NOTIFY can tell
    this process of an approval made by another one (a second service on the same database,
    whose changes this process's feed is not poked for)."""
    from recovery_server.access import console
    from recovery_server.app import FEED, METRICS
    from recovery_server.service import RecoveryService

    from .conftest import Fleet
    from .test_agent_flow import wait_for
    from .test_server import BAD_PATH as PATH
    from .test_server import BAD_SHA as SHA
    from .test_server import poll, report

    with postgres_schema() as url:
        fleet = Fleet(store_url=url, key=SigningKey.generate(), poll_tick_s=3600)
        await fleet.start()
        other = RecoveryService(store=Store(url), server_key=fleet.key)
        try:
            feed = fleet.server.app[FEED]
            await wait_for(lambda: feed.listening, timeout=60)
            key = SigningKey.generate()
            await fleet.enroll("dev-1", key)
            _, receipt = await report(fleet, "dev-1", key)
            rem = other.create_remediation(
                other.authenticate(other.create_user(console("t"), "olga", "operator").token),
                title="q",
                incident_id=receipt.incident_id,
                actions=[{"type": "quarantine_file", "path": PATH, "sha256": SHA}],
            )
            waiting = asyncio.create_task(poll(fleet, receipt, wait=300))
            metrics = fleet.server.app[METRICS]
            await wait_for(lambda: metrics.long_polls_waiting == 1, timeout=60)
            approver = other.authenticate(other.create_user(console("t"), "ada", "approver").token)
            other.approve(approver, rem.remediation_id)
            assert (await asyncio.wait_for(waiting, 120)).status == "directive"
        finally:
            other.store.close()
            await fleet.stop()
