"""The recovery server over real HTTP: enrollment, challenges, diagnostics, approval rules,
and what survives a restart. Each refusal must leave the store unchanged."""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys

import aiohttp
import pytest

from recovery_agent.protocol.admin import AdminClient
from recovery_agent.protocol.client import DeviceClient, ServerRefused
from recovery_agent.protocol.envelope import open_directive, seal, seal_bytes
from recovery_agent.protocol.keys import SigningKey
from recovery_agent.protocol.wire import (
    BootState,
    CrashKind,
    CrashSignature,
    Diagnostics,
    FileRecord,
    SystemInfo,
    utcnow,
)
from recovery_server.app import FEED, METRICS
from recovery_server.errors import BadRequest, Conflict, Forbidden

from .conftest import FAST_RETRY

BAD_PATH = "var/lib/sensor/channels/C-00000291-00000000-00000032.sys"
BAD_SHA = "b" * 64


def crash() -> CrashSignature:
    return CrashSignature(
        kind=CrashKind.KERNEL_PANIC,
        title="general protection fault in sensor_parse_channel",
        guilty_module="sensor",
        channel_file=BAD_PATH,
    )


async def report(
    fleet, device: str, key: SigningKey, *, sha: str = BAD_SHA, nonce: str | None = None, title: str = ""
):
    """``title``: another crash's (another incident)."""
    async with DeviceClient(fleet.url, retry=FAST_RETRY) as c:
        ch = await c.challenge(device)
        d = Diagnostics(
            device_id=device,
            server_nonce=nonce or ch.nonce,
            agent_nonce="a" * 32,
            created_at=utcnow(),
            agent_version="t",
            boot=BootState(boot_count=2, boot_limit=2),
            crash=crash().model_copy(update={"title": title}) if title else crash(),
            system=SystemInfo(),
            channel_files=[FileRecord(path=BAD_PATH, size=172, mtime=0, sha256=sha)],
        )
        raw = seal_bytes(d, key)
        return raw, await c.send_diagnostics(raw)


async def poll(fleet, receipt, wait: float = 0):
    async with DeviceClient(fleet.url, retry=FAST_RETRY) as c:
        return await c.poll_directive(receipt, wait_s=wait)


@pytest.fixture
async def device(fleet):
    key = SigningKey.generate()
    await fleet.enroll("dev-1", key)
    return key


async def test_enrollment_needs_a_valid_token(fleet):
    from recovery_agent.protocol.keys import public_b64
    from recovery_agent.protocol.wire import Enrollment

    key = SigningKey.generate()
    msg = Enrollment(
        device_id="dev-x",
        public_key=public_b64(key.public),
        enrollment_token="enr_not-a-real-token-at-all",
        created_at=utcnow(),
    )
    async with DeviceClient(fleet.url, retry=FAST_RETRY) as c:
        with pytest.raises(ServerRefused, match="enrollment token not valid") as e:
            await c.enroll(seal_bytes(msg, key))
    assert e.value.status == 401
    assert fleet.count("devices") == 0


async def test_enrollment_with_another_key_for_same_device_is_refused(fleet, device):
    with pytest.raises(ServerRefused, match="enrolled with another key"):
        await fleet.enroll("dev-1", SigningKey.generate())
    assert (await fleet.enroll("dev-1", device))["status"] == "already_enrolled"


async def test_enrollment_signed_by_another_key_than_it_names_is_refused(fleet):
    from recovery_agent.protocol.keys import public_b64
    from recovery_agent.protocol.wire import Enrollment

    named, signer = SigningKey.generate(), SigningKey.generate()
    msg = Enrollment(
        device_id="dev-x",
        public_key=public_b64(named.public),
        enrollment_token=fleet.enrollment_token,
        created_at=utcnow(),
    )
    async with DeviceClient(fleet.url, retry=FAST_RETRY) as c:
        with pytest.raises(ServerRefused, match="no signature by a trusted key"):
            await c.enroll(seal_bytes(msg, signer))
    assert fleet.count("devices") == 0


async def test_diagnostics_open_an_incident_clustered_by_signature(fleet, device):
    other = SigningKey.generate()
    await fleet.enroll("dev-2", other)
    _, r1 = await report(fleet, "dev-1", device)
    _, r2 = await report(fleet, "dev-2", other)
    assert r1.incident_id == r2.incident_id
    inc = fleet.service.incidents(fleet.viewer)
    assert len(inc) == 1 and inc[0].report_count == 2 and inc[0].devices == ["dev-1", "dev-2"]
    assert inc[0].guilty_module == "sensor" and inc[0].channel_file == BAD_PATH


async def test_replayed_diagnostics_are_refused_and_change_nothing(fleet, device):
    raw, _ = await report(fleet, "dev-1", device)
    before = (fleet.count("reports"), fleet.count("events"))
    async with DeviceClient(fleet.url, retry=FAST_RETRY) as c:
        with pytest.raises(ServerRefused, match="already used: a replayed message") as e:
            await c.send_diagnostics(raw)
    assert e.value.status == 409
    assert (fleet.count("reports"), fleet.count("events")) == before


async def test_unknown_nonce_is_refused(fleet, device):
    with pytest.raises(ServerRefused, match="unknown challenge nonce"):
        await report(fleet, "dev-1", device, nonce="x" * 32)
    assert fleet.count("reports") == 0


async def test_challenges_reveal_no_device_ids_and_write_nothing(fleet, device):
    """Known and unknown ids get the same answer; no call writes a row or an audit entry."""
    before = (fleet.count("nonces"), fleet.count("events"))
    async with aiohttp.ClientSession() as s:
        answers = {}
        for device_id in ("dev-1", "dev-unknown", "x" * 64):
            async with s.post(fleet.url + "/v1/challenge", json={"device_id": device_id}) as r:
                answers[device_id] = (r.status, tuple(sorted(await r.json())))
        async with s.post(fleet.url + "/v1/challenge", json={"device_id": "../etc"}) as r:
            assert r.status == 400 and "device_id" in (await r.json())["error"]
    assert set(answers.values()) == {(200, ("expires_at", "nonce"))}
    for _ in range(50):
        fleet.service.challenge("dev-1")
    assert (fleet.count("nonces"), fleet.count("events")) == before


async def test_a_challenge_works_once_for_its_own_device_until_it_expires(fleet, device):
    from datetime import timedelta

    from recovery_server.challenges import Challenges, challenge_key

    other = SigningKey.generate()
    await fleet.enroll("dev-2", other)
    for nonce in (
        fleet.service.challenge("dev-2").nonce,  # another device's
        fleet.service.challenge("dev-1").nonce[:-2] + "AA",  # altered
        "A" * 54,  # made up, of the right length
        # issued by another server (another key)
        Challenges(challenge_key(SigningKey.generate()), fleet.service.now, timedelta(minutes=5))
        .issue("dev-1")
        .nonce,
    ):
        with pytest.raises(ServerRefused, match="unknown challenge nonce") as e:
            await report(fleet, "dev-1", device, nonce=nonce)
        assert e.value.status == 401
    nonce = fleet.service.challenge("dev-1").nonce
    real_clock = fleet.service.clock
    fleet.service.clock = lambda: real_clock() + fleet.settings.nonce_ttl
    with pytest.raises(ServerRefused, match="challenge nonce expired"):
        await report(fleet, "dev-1", device, nonce=nonce)
    fleet.service.clock = real_clock
    await report(fleet, "dev-1", device, nonce=nonce)
    assert fleet.count("reports") == 1 and fleet.count("nonces") == 1
    with pytest.raises(ServerRefused, match="already used") as e:
        await report(fleet, "dev-1", device, nonce=nonce)
    assert e.value.status == 409


async def test_diagnostics_from_unknown_key_are_refused(fleet, device):
    stranger = SigningKey.generate()
    with pytest.raises(ServerRefused, match="no signature by a trusted key") as e:
        await report(fleet, "dev-1", stranger)
    assert e.value.status == 401
    assert fleet.count("reports") == 0 and fleet.count("incidents") == 0


async def test_diagnostics_signed_by_another_enrolled_device_are_refused(fleet, device):
    other = SigningKey.generate()
    await fleet.enroll("dev-2", other)
    with pytest.raises(ServerRefused, match="signed by the key of 'dev-2'"):
        await report(fleet, "dev-1", other)
    assert fleet.count("reports") == 0


async def test_tampered_diagnostics_are_refused(fleet, device):
    async with DeviceClient(fleet.url, retry=FAST_RETRY) as c:
        ch = await c.challenge("dev-1")
        d = Diagnostics(
            device_id="dev-1",
            server_nonce=ch.nonce,
            agent_nonce="a" * 32,
            created_at=utcnow(),
            agent_version="t",
            boot=BootState(boot_count=2, boot_limit=2),
            crash=crash(),
            system=SystemInfo(),
        )
        env = seal(d, device)
        payload = base64.b64decode(env["payload"]).replace(b'"boot_count":2', b'"boot_count":0')
        env["payload"] = base64.b64encode(payload).decode()
        with pytest.raises(ServerRefused, match="does not verify") as e:
            await c.send_diagnostics(json.dumps(env).encode())
    assert e.value.status == 400
    assert fleet.count("reports") == 0
    assert fleet.count("nonces") == 0, "the refused report spent no nonce"


async def test_unapproved_remediation_is_never_served(fleet, device):
    _, receipt = await report(fleet, "dev-1", device)
    rem = fleet.service.create_remediation(
        fleet.user("alice"),
        title="quarantine",
        incident_id=receipt.incident_id,
        actions=[{"type": "quarantine_file", "path": BAD_PATH, "sha256": BAD_SHA}],
    )
    assert (await poll(fleet, receipt, wait=1.2)).status == "pending"
    with pytest.raises(Forbidden, match="alice wrote .* cannot approve it"):
        fleet.service.approve(fleet.user("alice"), rem.remediation_id)
    with pytest.raises(Forbidden, match="needs the approver role"):
        fleet.service.approve(fleet.user("oscar"), rem.remediation_id)
    assert (await poll(fleet, receipt)).status == "pending"
    assert fleet.count("directives") == 0
    fleet.service.approve(fleet.user("bob"), rem.remediation_id)
    answer = await poll(fleet, receipt)
    assert answer.status == "directive"
    v = open_directive(
        answer.envelope,
        {fleet.key.key_id: fleet.key.public},
        device_id="dev-1",
        agent_nonce="a" * 32,
        diagnostics_sha256=receipt.diagnostics_sha256,
        now=utcnow(),
    )
    assert v.message.actions[0].path == BAD_PATH


async def test_m_of_n_needs_distinct_approvers(fleet, device):
    _, receipt = await report(fleet, "dev-1", device)
    rem = fleet.service.create_remediation(
        fleet.user("oscar"),
        title="q",
        incident_id=receipt.incident_id,
        required_approvals=2,
        actions=[{"type": "quarantine_file", "path": BAD_PATH, "sha256": BAD_SHA}],
    )
    fleet.service.approve(fleet.user("alice"), rem.remediation_id)
    with pytest.raises(Conflict, match="already approved"):
        fleet.service.approve(fleet.user("alice"), rem.remediation_id)
    assert (await poll(fleet, receipt)).status == "pending"
    fleet.service.approve(fleet.user("bob"), rem.remediation_id)
    assert (await poll(fleet, receipt)).status == "directive"


async def test_long_poll_wakes_on_approval(fleet, device):
    """With the periodic re-read off, only the approval's wake-up can end the poll before its
    60 s: the answer must come well before that."""
    import asyncio

    from .test_agent_flow import wait_for

    fleet.poll_tick_s = 3600
    await fleet.restart()
    _, receipt = await report(fleet, "dev-1", device)
    rem = fleet.service.create_remediation(
        fleet.user("alice"),
        title="q",
        incident_id=receipt.incident_id,
        actions=[{"type": "quarantine_file", "path": BAD_PATH, "sha256": BAD_SHA}],
    )
    waiting = asyncio.create_task(poll(fleet, receipt, wait=60))
    metrics = fleet.server.app[METRICS]
    await wait_for(lambda: metrics.long_polls_waiting == 1, timeout=30)
    fleet.service.approve(fleet.user("bob"), rem.remediation_id)
    assert (await asyncio.wait_for(waiting, 30)).status == "directive"


def count_looks(fleet, monkeypatch) -> list[str]:
    """From now on, the report id of every poll's look (service.look), in order."""
    looks: list[str] = []
    look = fleet.service.look

    def counted(report_id: str, token: str):
        looks.append(report_id)
        return look(report_id, token)

    monkeypatch.setattr(fleet.service, "look", counted)
    return looks


async def test_a_waiting_poll_is_not_looked_at_again_until_its_own_incident_changes(
    fleet, device, monkeypatch
):
    """Long polls wait on their incident (changefeed.py): while nothing changes, the feed
    reads the log once a tick for the whole process and no poll is looked at again; a fix
    approved for another incident does not wake them; their own incident's fix does."""
    import asyncio

    from .test_agent_flow import wait_for

    fleet.poll_tick_s = 0.02
    await fleet.restart()
    feed = fleet.server.app[FEED]
    other_key = SigningKey.generate()
    await fleet.enroll("dev-2", other_key)
    _, mine = await report(fleet, "dev-1", device)
    _, other = await report(fleet, "dev-2", other_key, title="kernel BUG in sensor_other_path")
    assert mine.incident_id != other.incident_id
    looks = count_looks(fleet, monkeypatch)
    waiting = asyncio.create_task(poll(fleet, mine, wait=60))
    metrics = fleet.server.app[METRICS]
    await wait_for(lambda: metrics.long_polls_waiting == 1, timeout=30)

    async def ticks(n: int) -> None:
        start = feed.reads
        await wait_for(lambda: feed.reads >= start + n, timeout=30)

    await ticks(20)
    assert looks.count(mine.report_id) == 1, "not looked at again while nothing changed"

    def approve(incident_id: str) -> None:
        rem = fleet.service.create_remediation(
            fleet.user("alice"),
            title="q",
            incident_id=incident_id,
            actions=[{"type": "quarantine_file", "path": BAD_PATH, "sha256": BAD_SHA}],
        )
        fleet.service.approve(fleet.user("bob"), rem.remediation_id)

    approve(other.incident_id)
    assert (await poll(fleet, other)).status == "directive"
    await ticks(5)
    assert looks.count(mine.report_id) == 1, "another incident's fix does not wake this poll"
    assert not waiting.done()
    approve(mine.incident_id)
    assert (await asyncio.wait_for(waiting, 30)).status == "directive"
    assert looks.count(mine.report_id) == 2


async def test_a_poll_waits_no_longer_than_the_servers_max_poll(fleet, device):
    """``serve --max-poll`` (behind a proxy with a short read timeout): a poll asking to wait
    300 s is answered 'pending' when the server's own limit runs out."""
    import asyncio

    fleet.max_poll_s = 0.5
    await fleet.restart()
    _, receipt = await report(fleet, "dev-1", device)
    answer = await asyncio.wait_for(poll(fleet, receipt, wait=300), 60)
    assert answer.status == "pending"


async def test_a_rollout_resumed_wakes_the_polls_of_its_incident(fleet, device):
    """A rollout's move is a change to the fix too: a poll that waits while the rollout is
    paused is answered when a person resumes it (with the feed's periodic read off)."""
    import asyncio

    from recovery_server.access import User

    from .test_agent_flow import wait_for

    fleet.poll_tick_s = 3600
    await fleet.restart()
    _, receipt = await report(fleet, "dev-1", device)
    rem = fleet.service.create_remediation(
        fleet.user("alice"),
        title="q",
        incident_id=receipt.incident_id,
        actions=[{"type": "quarantine_file", "path": BAD_PATH, "sha256": BAD_SHA}],
    )
    operator, approver = User("oscar", "operator"), User("alice", "approver")
    ro = fleet.service.create_rollout(
        operator, rem.remediation_id, {"waves": [{"name": "all", "percent": 100}]}
    )
    fleet.service.set_rollout_state(operator, ro.rollout_id, "pause")
    fleet.service.approve(fleet.user("bob"), rem.remediation_id)
    waiting = asyncio.create_task(poll(fleet, receipt, wait=60))
    metrics = fleet.server.app[METRICS]
    await wait_for(lambda: metrics.long_polls_waiting == 1, timeout=30)
    fleet.service.set_rollout_state(approver, ro.rollout_id, "resume")
    assert (await asyncio.wait_for(waiting, 30)).status == "directive"


async def test_a_promotion_wakes_only_the_polls_whose_wave_it_opens(fleet, monkeypatch):
    """A poll whose fix has a rollout waits on its incident and its device's wave: the canary's
    healthy boot promotes the rollout to the next wave, which wakes that wave's polls (and
    serves them), not those of the wave after it (with the feed's periodic read off)."""
    import asyncio

    from recovery_agent.protocol.keys import key_id
    from recovery_server.access import User
    from recovery_server.rollout import wave_of

    from .fleetsim import BAD_PATH as PATH
    from .fleetsim import BAD_SHA as SHA
    from .fleetsim import HttpDevice
    from .test_agent_flow import wait_for

    fleet.poll_tick_s = 3600
    await fleet.restart()
    ring = {key_id(fleet.key.public): fleet.key.public}
    async with DeviceClient(fleet.url, retry=FAST_RETRY) as client:
        # Enrolled before the rollout starts, so that their outcomes count for its gates.
        devices = [HttpDevice(f"dev-{i:02d}", client, ring) for i in range(40)]
        for dev in devices:
            await fleet.enroll(dev.device_id, dev.key)
        canary = devices[0]
        await canary.report()
        rem = fleet.service.create_remediation(
            fleet.user("alice"),
            title="q",
            incident_id=canary.receipt.incident_id,
            actions=[{"type": "quarantine_file", "path": PATH, "sha256": SHA}],
        )
        plan = {
            "waves": [
                {"name": "canary", "devices": [canary.device_id]},
                {"name": "half", "percent": 50},
                {"name": "all", "percent": 100},
            ],
            "min_devices": 1,
            "min_success_rate": 0.5,
        }
        ro = fleet.service.create_rollout(User("oscar", "operator"), rem.remediation_id, plan)
        fleet.service.approve(fleet.user("bob"), rem.remediation_id)
        waves = {dev.device_id: wave_of(ro.plan, ro.rollout_id, dev.device_id) for dev in devices[1:]}
        # One device of each later wave (40 devices: both waves hold some but once in 2**38).
        half = next(dev for dev in devices[1:] if waves[dev.device_id] == 1)
        rest = next(dev for dev in devices[1:] if waves[dev.device_id] == 2)
        await half.report()
        await rest.report()
        looks = count_looks(fleet, monkeypatch)
        waiting = {dev.device_id: asyncio.create_task(dev.poll(wait_s=60)) for dev in (half, rest)}
        metrics = fleet.server.app[METRICS]
        await wait_for(lambda: metrics.long_polls_waiting == 2, timeout=30)
        assert await canary.poll() and not any(t.done() for t in waiting.values())
        await canary.recover()  # its healthy boot passes the canary's gate: "half" opens
        assert await asyncio.wait_for(waiting[half.device_id], 30)
        assert fleet.service.rollout(User("oscar", "operator"), ro.rollout_id).current_wave == 1
        await wait_for(lambda: metrics.long_polls_waiting == 1, timeout=30)
        assert looks.count(rest.receipt.report_id) == 1, "woken by the promotion to an earlier wave"
        assert not waiting[rest.device_id].done()
        await half.recover()  # and now "all" opens
        assert await asyncio.wait_for(waiting[rest.device_id], 30)
        assert looks.count(rest.receipt.report_id) == 2


async def test_fix_for_other_content_is_not_served(fleet, device):
    """The device reported the file with other content (say, the fixed version 291 with the
    same name): a quarantine of the bad content is not for it."""
    _, receipt = await report(fleet, "dev-1", device, sha="c" * 64)
    rem = fleet.service.create_remediation(
        fleet.user("alice"),
        title="q",
        incident_id=receipt.incident_id,
        actions=[{"type": "quarantine_file", "path": BAD_PATH, "sha256": BAD_SHA}],
    )
    fleet.service.approve(fleet.user("bob"), rem.remediation_id)
    assert (await poll(fleet, receipt)).status == "none"
    assert fleet.count("directives") == 0


async def test_viewer_cannot_write_and_scripts_cannot_be_expressed(fleet):
    with pytest.raises(Forbidden):
        fleet.service.create_remediation(
            fleet.user("victor"),
            title="x",
            incident_id=None,
            actions=[{"type": "disable_driver", "name": "sensor"}],
        )
    with pytest.raises(BadRequest, match="(?s)do not fit the protocol.*run_script"):
        fleet.service.create_remediation(
            fleet.user("alice"),
            title="x",
            incident_id=None,
            actions=[{"type": "run_script", "script": "rm -rf /"}],
        )
    with pytest.raises(BadRequest, match="'..' component"):
        fleet.service.create_remediation(
            fleet.user("alice"),
            title="x",
            incident_id=None,
            actions=[{"type": "quarantine_file", "path": "var/../../etc/passwd", "sha256": BAD_SHA}],
        )
    assert fleet.count("remediations") == 0


async def test_restart_mid_flow_loses_nothing(fleet, device):
    _, receipt = await report(fleet, "dev-1", device)
    rem = fleet.service.create_remediation(
        fleet.user("oscar"),
        title="q",
        incident_id=receipt.incident_id,
        required_approvals=2,
        actions=[{"type": "quarantine_file", "path": BAD_PATH, "sha256": BAD_SHA}],
    )
    fleet.service.approve(fleet.user("bob"), rem.remediation_id)
    await fleet.restart()
    assert [d.device_id for d in fleet.service.devices(fleet.viewer)] == ["dev-1"]
    assert fleet.service.incidents(fleet.viewer)[0].incident_id == receipt.incident_id
    assert [a.approver for a in fleet.service.remediation(fleet.viewer, rem.remediation_id).approvals] == [
        "bob"
    ]
    fleet.service.approve(fleet.user("alice"), rem.remediation_id)
    assert (await poll(fleet, receipt)).status == "directive"
    await fleet.restart()
    again = await poll(fleet, receipt)  # the same signed directive, not a second one
    assert again.status == "directive" and fleet.count("directives") == 1


async def test_admin_api_needs_a_token_and_reports_errors_as_json(fleet):
    async with aiohttp.ClientSession() as s:
        async with s.get(fleet.url + "/v1/admin/devices") as r:
            assert r.status == 401 and "no admin token" in (await r.json())["error"]
        async with s.get(fleet.url + "/v1/admin/devices", headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401 and "not recognised" in (await r.json())["error"]
        async with s.post(fleet.url + "/v1/challenge", data=b'{"device_id": "a", "device_id": "b"}') as r:
            assert r.status == 400 and "duplicate JSON key" in (await r.json())["error"]
        async with s.post(fleet.url + "/v1/diagnostics", data=b"x" * (2 << 20)) as r:
            assert r.status == 413


async def test_schema_version_is_recorded_and_newer_refused(store_url):
    from recovery_server.store import SCHEMA_VERSION, Store, StoreError

    s = Store(store_url)
    assert s.one("SELECT value FROM schema_meta WHERE key = 'version'")[0] == str(SCHEMA_VERSION)
    with s.tx() as tx:
        tx.execute("UPDATE schema_meta SET value = ? WHERE key = 'version'", str(SCHEMA_VERSION + 1))
    s.close()
    with pytest.raises(StoreError, match="newer than this server"):
        Store(store_url)


def test_unreachable_postgres_is_a_clear_error():
    from recovery_server.store import Store, StoreError

    with pytest.raises(
        StoreError, match=r"cannot connect to PostgreSQL at postgresql://u:\*\*\*@127.0.0.1:1/x"
    ):
        Store("postgresql://u:secret@127.0.0.1:1/x?connect_timeout=2")


def test_catalog_proposes_a_driver_rollback_when_the_crash_is_in_a_newer_driver():
    from recovery_server.catalog import propose

    driver = "lib/modules/6.1.0-56-amd64/extra/sensor.ko"
    store_v1 = "var/lib/driver-store/sensor/1.0/sensor.ko"
    d = Diagnostics(
        device_id="d",
        server_nonce="n" * 32,
        agent_nonce="a" * 32,
        created_at=utcnow(),
        agent_version="t",
        boot=BootState(boot_count=2, boot_limit=2),
        crash=CrashSignature(
            kind=CrashKind.KERNEL_PANIC,
            title="BUG: kernel NULL pointer dereference in sensor_v2_init_tables",
            guilty_module="sensor",
        ),
        system=SystemInfo(),
        drivers=[FileRecord(path=driver, size=1, mtime=0, sha256="2" * 64, version="2.0")],
        driver_store=[FileRecord(path=store_v1, size=1, mtime=0, sha256="1" * 64, version="1.0")],
    )
    p = propose({"channel_file": None, "guilty_module": "sensor"}, [d])
    assert p.actions == [{"type": "restore_file", "path": driver, "source": store_v1, "sha256": "1" * 64}]
    # The same version in the store is no fix; a crash in no module has no known fix.
    same = d.model_copy(
        update={"driver_store": [FileRecord(path=store_v1, size=1, mtime=0, sha256="2" * 64, version="2.0")]}
    )
    assert propose({"channel_file": None, "guilty_module": "sensor"}, [same]).actions == []
    assert "no known fix" in propose({"channel_file": None, "guilty_module": None}, [d]).why[0]


def test_catalog_disables_a_driver_that_hangs_the_boot_when_no_other_version_is_stored():
    from recovery_server.catalog import propose

    d = Diagnostics(
        device_id="d",
        server_nonce="n" * 32,
        agent_nonce="a" * 32,
        created_at=utcnow(),
        agent_version="t",
        boot=BootState(boot_count=2, boot_limit=2),
        crash=CrashSignature(
            kind=CrashKind.HANG, title="boot hung: load module sensor", guilty_module="sensor"
        ),
        system=SystemInfo(),
    )
    p = propose({"kind": "hang", "channel_file": None, "guilty_module": "sensor"}, [d])
    assert p.actions == [{"type": "disable_driver", "name": "sensor"}]
    assert (
        propose({"kind": "kernel_panic", "channel_file": None, "guilty_module": "sensor"}, [d]).actions == []
    )


ROLE_MATRIX = [
    # (method, path under /v1/admin, body, lowest role allowed); ids filled in from the fleet
    ("GET", "/whoami", None, "viewer"),
    ("GET", "/devices", None, "viewer"),
    ("GET", "/incidents", None, "viewer"),
    ("GET", "/incidents/{incident_id}", None, "viewer"),
    ("GET", "/incidents/{incident_id}/suggestion", None, "viewer"),
    ("GET", "/incidents/{incident_id}/correlation", None, "viewer"),
    ("GET", "/incidents/{incident_id}/summary", None, "viewer"),
    ("GET", "/incidents/{incident_id}/timeline", None, "viewer"),
    ("GET", "/devices/{device_id}", None, "viewer"),
    ("GET", "/remediations", None, "viewer"),
    (
        "POST",
        "/remediations",
        {"title": "t", "actions": [{"type": "disable_driver", "name": "sensor"}]},
        "operator",
    ),
    ("POST", "/remediations/{remediation_id}/approve", None, "approver"),
    ("POST", "/remediations/{remediation_id}/revoke", None, "approver"),
    (
        "POST",
        "/remediations/{remediation_id}/rollout",
        {"waves": [{"name": "all", "percent": 100}]},
        "operator",
    ),
    ("GET", "/rollouts", None, "viewer"),
    ("GET", "/rollouts/{rollout_id}", None, "viewer"),
    ("POST", "/rollouts/{rollout_id}/pause", None, "operator"),
    ("POST", "/rollouts/{rollout_id}/resume", None, "approver"),
    ("POST", "/rollouts/{rollout_id}/revoke", None, "approver"),
    ("POST", "/me/key", {"public_key": "A" * 43 + "="}, "viewer"),
    ("POST", "/users", {"name": "newbie", "role": "viewer"}, "admin"),
    ("POST", "/enrollment-tokens", {"label": "x"}, "admin"),
    ("GET", "/enrollment-tokens", None, "admin"),
    ("POST", "/enrollment-tokens/{token_id}/revoke", None, "admin"),
    ("POST", "/devices/{device_id}/revoke", None, "admin"),
    ("POST", "/devices/{device_id}/recovery-test", None, "operator"),
    ("GET", "/devices/{device_id}/disk-keys", None, "viewer"),
    ("POST", "/devices/{device_id}/disk-keys/revoke", None, "approver"),
    ("POST", "/key-releases/{release_id}/approve", None, "approver"),
    ("POST", "/key-releases/{release_id}/refuse", None, "approver"),
    ("GET", "/rules", None, "viewer"),
    ("POST", "/rules", {"title": "bad", "path_pattern": "var/lib/x/*.sys", "sha256": "a" * 64}, "operator"),
    ("POST", "/rules/{rule_id}/approve", None, "approver"),
    ("POST", "/rules/{rule_id}/revoke", None, "approver"),
    ("POST", "/devices/{device_id}/key", {"public_key": "B" * 43 + "="}, "admin"),
    ("GET", "/events", None, "viewer"),
    ("GET", "/audit/verify", None, "viewer"),
]


async def pending_release(fleet, device_id: str, key: SigningKey, report_id: str) -> str:
    """A disk key escrowed by ``device_id`` and asked for in its recovery visit ``report_id``:
    the release that waits for a person (tests/test_disk_keys.py)."""
    from .test_disk_keys import escrowed, post, request_body

    await escrowed(fleet, device_id, key, secrets.token_bytes(32))
    answer = await post(fleet, await request_body(fleet, device_id, key, report_id))
    assert answer.status == "pending"
    return answer.release_id


def test_the_role_matrix_covers_every_admin_route():
    from recovery_server.app import ROUTES

    admin_routes = {
        (r.method, r.path.removeprefix("/v1/admin"))
        for r in ROUTES
        if r.auth == "admin" and r.path.startswith("/v1/admin/")
    }
    assert {(method, path) for method, path, _, _ in ROLE_MATRIX} == admin_routes
    # Outside the admin API only /metrics takes a person's token (any role: test_api_contract.py).
    assert {r.path for r in ROUTES if r.auth == "admin" and not r.path.startswith("/v1/admin/")} == {
        "/metrics"
    }


@pytest.mark.parametrize("method, path, body, lowest", ROLE_MATRIX)
async def test_each_role_gets_exactly_what_it_may(fleet, device, method, path, body, lowest):
    """Below the lowest role: 403 naming the role needed. From it up: done, or refused only
    for the state an earlier role left (a rollout already set, a rollout already revoked)."""
    from recovery_server.access import ROLES

    _, receipt = await report(fleet, "dev-1", device)
    rem = fleet.service.create_remediation(
        fleet.user("oscar"),
        title="q",
        incident_id=receipt.incident_id,
        actions=[{"type": "quarantine_file", "path": BAD_PATH, "sha256": BAD_SHA}],
    )
    ro = fleet.service.create_rollout(
        fleet.user("oscar"), rem.remediation_id, {"waves": [{"name": "all", "percent": 100}]}
    )
    ids = {
        "incident_id": receipt.incident_id,
        "remediation_id": rem.remediation_id,
        "rollout_id": ro.rollout_id,
        "device_id": "dev-1",
        "token_id": fleet.service.enrollment_tokens(fleet.admin)[0].token_id,
        "release_id": await pending_release(fleet, "dev-1", device, receipt.report_id),
        "rule_id": fleet.service.create_rule(
            fleet.user("oscar"), {"title": "bad", "path_pattern": "var/x/*", "sha256": "b" * 64}
        ).rule_id,
    }
    tokens = {role: fleet.service.create_user(fleet.admin, f"p-{role}", role).token for role in ROLES}
    async with AdminClient(fleet.url, retry=FAST_RETRY) as c:
        for role in ROLES:
            payload = dict(body, name=f"newbie-{role}") if path == "/users" else body
            call = c.call(method, path.format(**ids), payload, token=tokens[role])
            if ROLES.index(role) >= ROLES.index(lowest):
                try:
                    await call
                except ServerRefused as e:  # only a conflict with the state is fine here
                    assert e.status == 409, f"{role}: {e.message}"
            else:
                with pytest.raises(
                    ServerRefused, match=f"p-{role} is {role}; this needs the {lowest} role"
                ) as e:
                    await call
                assert e.value.status == 403


async def test_approval_needs_the_approver_role_and_not_the_authorship(fleet, device):
    _, receipt = await report(fleet, "dev-1", device)
    rem = fleet.service.create_remediation(
        fleet.user("admin"),
        title="q",
        incident_id=receipt.incident_id,
        actions=[{"type": "quarantine_file", "path": BAD_PATH, "sha256": BAD_SHA}],
    )
    with pytest.raises(Forbidden, match="admin wrote"):
        fleet.service.approve(fleet.user("admin"), rem.remediation_id)
    assert fleet.service.approve(fleet.user("alice"), rem.remediation_id).status == "approved"


def test_a_version_1_database_is_migrated_in_place(tmp_path):
    import sqlite3

    from recovery_server import store as store_mod

    path = tmp_path / "v1.db"
    db = sqlite3.connect(path)
    for statement in store_mod._SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)
    db.execute("INSERT INTO schema_meta VALUES ('version', '1')")
    db.execute("INSERT INTO users VALUES ('old', 'admin', 'x', '2026-01-01T00:00:00Z')")
    db.commit()
    db.close()
    s = store_mod.Store(path)
    assert s.one("SELECT value FROM schema_meta WHERE key = 'version'")[0] == str(store_mod.SCHEMA_VERSION)
    row = s.one("SELECT name, public_key FROM users")
    assert row["name"] == "old" and row["public_key"] is None, "data kept, new column added"
    s.close()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=60)


def test_a_missing_or_damaged_server_key_is_a_message_and_exit_2(tmp_path):
    data = str(tmp_path / "data")
    p = _cli("recovery_server.cli", "--data", data, "serve")
    assert p.returncode == 2 and "no server key" in p.stderr and "init" in p.stderr
    (tmp_path / "data").mkdir()
    (tmp_path / "data/server.key").write_text("not a key\n")
    for cmd in ("serve", "init"):
        p = _cli("recovery_server.cli", "--data", data, cmd)
        assert p.returncode == 2, p.stderr
        assert "cannot be used as the server key" in p.stderr and "Traceback" not in p.stderr


def test_audit_verify_of_a_database_that_is_not_there_says_so_and_makes_none(tmp_path):
    """audit-verify at a mistyped path made an empty database, whose empty chain verified."""
    for where in (["--data", str(tmp_path / "nowhere")], ["--database", str(tmp_path / "typo.db")]):
        p = _cli("recovery_server.cli", *where, "audit-verify")
        assert p.returncode == 2, p.stdout + p.stderr
        assert "no database at" in p.stderr and "Traceback" not in p.stderr
    assert list(tmp_path.iterdir()) == [], "nothing was made"


def test_token_files_are_new_0600_files_never_an_existing_file_or_a_symlink(tmp_path):
    """--token-file kept an existing file's 0644 mode and followed symlinks. A secret goes into
    a new file, 0600, or nowhere: the refusal comes before anything is made."""
    import os
    import stat

    data = str(tmp_path / "data")
    existing = tmp_path / "existing.token"
    existing.write_text("old\n")
    existing.chmod(0o644)
    outside = tmp_path / "outside"
    outside.write_text("not yours\n")
    link = tmp_path / "link.token"
    link.symlink_to(outside)
    dangling = tmp_path / "dangling.token"
    dangling.symlink_to(tmp_path / "nowhere")
    for path in (existing, link, dangling):
        p = _cli("recovery_server.cli", "--data", data, "init", "--token-file", str(path))
        assert p.returncode == 2, p.stderr
        assert f"{path} exists (a file or a symlink)" in p.stderr and "name a path" in p.stderr
    assert existing.read_text() == "old\n" and stat.S_IMODE(existing.stat().st_mode) == 0o644
    assert outside.read_text() == "not yours\n" and not (tmp_path / "nowhere").exists()
    assert not (tmp_path / "data").exists(), "refused before anything was made"

    fresh = tmp_path / "admin.token"
    old_umask = os.umask(0)
    try:
        p = _cli("recovery_server.cli", "--data", data, "init", "--token-file", str(fresh))
    finally:
        os.umask(old_umask)
    assert p.returncode == 0, p.stderr
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600 and fresh.read_text().startswith("qmr_")

    p = _cli(
        "recovery_server.cli",
        "--data",
        data,
        "user-add",
        "ann",
        "--role",
        "viewer",
        "--token-file",
        str(link),
    )
    assert p.returncode == 2 and "exists" in p.stderr
    from recovery_server.store import Store

    s = Store(tmp_path / "data/recovery.db")
    assert [r["name"] for r in s.all("SELECT name FROM users")] == ["admin"], "no user without a token"
    s.close()
    p = _cli(
        "recovery_server.cli",
        "--data",
        data,
        "user-add",
        "ann",
        "--role",
        "viewer",
        "--token-file",
        str(tmp_path / "ann.token"),
    )
    assert p.returncode == 0 and stat.S_IMODE((tmp_path / "ann.token").stat().st_mode) == 0o600

    # recovery-admin key: the private key is a secret too (refused before the server is asked).
    p = _cli("recovery_server.admin_cli", "--server", "http://127.0.0.1:1", "--token", "x", "key", str(link))
    assert p.returncode == 2 and "exists" in p.stderr
    assert outside.read_text() == "not yours\n"


@pytest.mark.parametrize("module", ["recovery_server.cli", "recovery_server.admin_cli"])
def test_the_command_lines_list_their_exit_codes(module):
    p = _cli(module, "--help")
    assert p.returncode == 0
    assert all(f"\n  {code}  " in p.stdout for code in "0123"), p.stdout


async def test_the_admin_client_reads_every_answer_into_its_model(fleet, device):
    """The typed client against the live server: each answer fits the model the server
    describes it with, so recovery-admin, the lab and the tests share one definition."""
    from recovery_agent.protocol.admin import RolloutPlan

    _, receipt = await report(fleet, "dev-1", device)
    admin = fleet.service.create_user(fleet.admin, "ada", "admin").token
    async with AdminClient(fleet.url, admin, retry=FAST_RETRY) as c:
        assert (await c.whoami()).role == "admin"
        oscar = await c.create_user("otto", "operator")
        bea = await c.create_user("bea", "approver")
        assert (await c.create_enrollment_token("lab")).label == "lab"
        [dev] = await c.devices()
        assert dev.device_id == "dev-1" and dev.state == "recovering"
        [inc] = await c.incidents()
        detail = await c.incident(inc.incident_id)
        assert detail.reports[0].diagnostics.channel_files[0].sha256 == BAD_SHA
        suggestion = await c.suggestion(inc.incident_id)
        assert suggestion.actions and suggestion.actions[0].path == BAD_PATH
    async with AdminClient(fleet.url, oscar.token, retry=FAST_RETRY) as c:
        rem = await c.create_remediation(suggestion.title, suggestion.actions, inc.incident_id)
        plan = RolloutPlan.model_validate({"waves": [{"name": "all", "percent": 100}]})
        ro = await c.create_rollout(rem.remediation_id, plan)
        assert (await c.set_rollout_state(ro.rollout_id, "pause")).state == "paused"
    async with AdminClient(fleet.url, bea.token, retry=FAST_RETRY) as c:
        assert (await c.approve(rem.remediation_id)).status == "approved"
        assert (await c.set_rollout_state(ro.rollout_id, "resume")).state == "active"
        [listed] = await c.rollouts()
        assert listed.plan == plan and [w.name for w in listed.waves] == ["all"]
        assert [r.remediation_id for r in await c.remediations()] == [rem.remediation_id]
        kinds = [e.kind for e in await c.events(device="dev-1")]
        assert kinds[:2] == ["device.enrolled", "incident.opened"]
        assert (await c.verify_audit()).ok
        assert (await c.revoke(rem.remediation_id)).status == "revoked"
