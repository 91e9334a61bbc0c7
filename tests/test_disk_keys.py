"""Encrypted disks, the server and the protocol: a device escrows its disk's recovery key
sealed to the server's escrow key; in recovery, after its diagnostics, it gets the key sealed
to a key it made for that one request, only as the enrolled device, only in that visit, only
when the policy (or a person) allows. Every refusal, and that the key is never in clear on the
wire, in the database and its WAL, or in a log."""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
from datetime import timedelta
from pathlib import Path

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

from recovery_agent.diskkey import KeyRefused, escrow, fetch_key
from recovery_agent.protocol import sealing
from recovery_agent.protocol.client import DeviceClient, ServerRefused
from recovery_agent.protocol.envelope import canonical_json, seal
from recovery_agent.protocol.keys import SigningKey, public_b64
from recovery_agent.protocol.wire import KeyRequest, utcnow
from recovery_server.diskkeys import ReleasePolicy
from recovery_server.service import ServiceSettings

from .clock import ManualClock
from .conftest import FAST_RETRY, Fleet, fleet_releasing_keys, running
from .test_server import report

SLOT = 7


@pytest.fixture
def secret() -> bytearray:
    return bytearray(secrets.token_bytes(32))


async def enrolled(fleet: Fleet, device_id: str = "dev-1") -> SigningKey:
    key = SigningKey.generate()
    await fleet.enroll(device_id, key)
    return key


async def escrowed(fleet: Fleet, device_id: str, key: SigningKey, secret, *, tpm: bool = False, url=None):
    async with DeviceClient(url or fleet.url, retry=FAST_RETRY) as c:
        return await escrow(c, key, public_b64(fleet.key.public), device_id, secret, SLOT, tpm_sealed=tpm)


async def fetch(
    fleet: Fleet, device_id: str, key: SigningKey, report_id: str, *, clock=None, url=None, said=None
):
    clock = clock or ManualClock()
    async with DeviceClient(url or fleet.url, retry=FAST_RETRY) as c:
        return await fetch_key(
            c,
            key,
            public_b64(fleet.key.public),
            device_id,
            report_id,
            clock=clock,
            deadline=clock.monotonic() + 600,
            retry_interval_s=60,
            say=(said.append if said is not None else lambda line: None),
        )


async def request_body(
    fleet: Fleet, device_id: str, key: SigningKey, report_id: str, *, signer=None
) -> bytes:
    async with DeviceClient(fleet.url, retry=FAST_RETRY) as c:
        ch = await c.challenge(device_id)
    eph = sealing.X25519PrivateKey.generate()
    msg = KeyRequest(
        device_id=device_id,
        server_nonce=ch.nonce,
        report_id=report_id,
        ephemeral_key=sealing.public_b64(eph.public_key()),
        created_at=utcnow(),
    )
    return canonical_json(seal(msg, signer or key))


async def post(fleet: Fleet, body: bytes):
    async with DeviceClient(fleet.url, retry=FAST_RETRY) as c:
        return await c.request_disk_key(body)


def kinds(fleet: Fleet, prefix: str = "disk_key.") -> list[str]:
    return [e.kind for e in fleet.service.events(fleet.viewer) if e.kind.startswith(prefix)]


async def test_a_person_approves_the_release_and_the_device_opens_exactly_its_key(fleet, secret, clock):
    key = await enrolled(fleet)
    answer = await escrowed(fleet, "dev-1", key, secret)
    assert answer["status"] == "escrowed"
    _, receipt = await report(fleet, "dev-1", key)

    said: list[str] = []
    task = asyncio.create_task(fetch(fleet, "dev-1", key, receipt.report_id, clock=clock, said=said))
    await clock.wait_for_sleeper()  # asked once: pending, asleep until the retry interval
    [pending] = fleet.service.disk_keys(fleet.viewer, "dev-1").releases
    assert pending.state == "pending" and pending.report_id == receipt.report_id
    assert "waits for a person" in said[0]
    fleet.service.decide_key_release(fleet.user("alice"), pending.release_id, True)
    await clock.release()
    got = await asyncio.wait_for(task, 60)
    assert got == secret
    view = fleet.service.disk_keys(fleet.viewer, "dev-1")
    assert view.releases[0].state == "released" and view.releases[0].released == 1
    assert view.releases[0].decided_by == "alice"
    assert kinds(fleet) == [
        "disk_key.escrowed",
        "disk_key.requested",
        "disk_key.release_approved",
        "disk_key.released",
    ]
    assert fleet.service.verify_audit(fleet.viewer).ok


async def test_a_tpm_sealed_device_gets_its_key_with_no_person(fleet, secret):
    key = await enrolled(fleet)
    await escrowed(fleet, "dev-1", key, secret, tpm=True)
    _, receipt = await report(fleet, "dev-1", key)
    assert await fetch(fleet, "dev-1", key, receipt.report_id) == secret
    [rel] = fleet.service.disk_keys(fleet.viewer, "dev-1").releases
    assert rel.decided_by == "policy: TPM-sealed device key"


async def test_while_nobody_approves_the_agent_asks_until_its_time_to_reboot(fleet, secret, clock):
    key = await enrolled(fleet)
    await escrowed(fleet, "dev-1", key, secret)
    _, receipt = await report(fleet, "dev-1", key)
    said: list[str] = []
    await clock.release()
    assert (
        await asyncio.wait_for(fetch(fleet, "dev-1", key, receipt.report_id, clock=clock, said=said), 60)
        is None
    )
    assert len(said) == 10, "every retry interval of the 600 s"
    [rel] = fleet.service.disk_keys(fleet.viewer, "dev-1").releases
    assert rel.state == "pending" and rel.released == 0


# ---------------------------------------------------------------- refusals


async def test_another_devices_key_cannot_ask_for_it(fleet, secret):
    key, other = await enrolled(fleet, "dev-1"), await enrolled(fleet, "dev-2")
    await escrowed(fleet, "dev-1", key, secret, tpm=True)
    _, receipt = await report(fleet, "dev-1", key)
    body = await request_body(fleet, "dev-1", key, receipt.report_id, signer=other)
    with pytest.raises(ServerRefused) as e:
        await post(fleet, body)
    assert e.value.status == 401 and "signed by the key of 'dev-2'" in e.value.message
    # dev-2 naming its own id but dev-1's report: not its recovery visit.
    body = await request_body(fleet, "dev-2", other, receipt.report_id)
    with pytest.raises(ServerRefused) as e:
        await post(fleet, body)
    assert e.value.status == 404, "dev-2 escrowed nothing"
    await escrowed(fleet, "dev-2", other, secrets.token_bytes(32), tpm=True)
    with pytest.raises(ServerRefused) as e:
        await post(fleet, await request_body(fleet, "dev-2", other, receipt.report_id))
    assert e.value.status == 403 and "not a failed-boot report of device dev-2" in e.value.message


async def test_a_replayed_request_is_refused(fleet, secret):
    key = await enrolled(fleet)
    await escrowed(fleet, "dev-1", key, secret, tpm=True)
    _, receipt = await report(fleet, "dev-1", key)
    body = await request_body(fleet, "dev-1", key, receipt.report_id)
    assert (await post(fleet, body)).status == "released"
    with pytest.raises(ServerRefused) as e:
        await post(fleet, body)
    assert e.value.status == 409 and "already used" in e.value.message


async def test_no_release_without_a_failed_boot_report_in_this_visit(fleet, secret):
    key = await enrolled(fleet)
    await escrowed(fleet, "dev-1", key, secret, tpm=True)
    with pytest.raises(KeyRefused, match="not a failed-boot report"):
        await fetch(fleet, "dev-1", key, "rpt-000000000000")
    _, receipt = await report(fleet, "dev-1", key)
    later = fleet.service.clock() + timedelta(hours=3)
    fleet.service.clock = lambda: later
    with pytest.raises(KeyRefused, match="longer ago than this recovery visit may last"):
        await fetch(fleet, "dev-1", key, receipt.report_id)
    assert kinds(fleet).count("disk_key.refused") == 2


async def test_a_revoked_device_gets_nothing(fleet, secret):
    key = await enrolled(fleet)
    await escrowed(fleet, "dev-1", key, secret, tpm=True)
    _, receipt = await report(fleet, "dev-1", key)
    fleet.service.revoke_device(fleet.admin, "dev-1")
    with pytest.raises(KeyRefused, match="revoked"):
        await fetch(fleet, "dev-1", key, receipt.report_id)


async def test_policy_off_a_persons_no_revoked_keys_and_the_daily_bound(store_url, secret):
    async with running(fleet_releasing_keys(store_url, ReleasePolicy(mode="off"))) as fleet:
        key = await enrolled(fleet)
        await escrowed(fleet, "dev-1", key, secret, tpm=True)
        _, receipt = await report(fleet, "dev-1", key)
        with pytest.raises(KeyRefused, match="release is off on this server"):
            await fetch(fleet, "dev-1", key, receipt.report_id)

    async with running(
        Fleet(
            store_url=store_url,
            key=fleet.key,
            escrow=fleet.escrow,
            settings=ServiceSettings(key_release=ReleasePolicy(max_per_day=2)),
        )
    ) as fleet:
        assert await fetch(fleet, "dev-1", key, receipt.report_id) == secret
        assert await fetch(fleet, "dev-1", key, receipt.report_id) == secret
        with pytest.raises(KeyRefused, match="2 times in the last day"):
            await fetch(fleet, "dev-1", key, receipt.report_id)

    async with running(Fleet(store_url=store_url, key=fleet.key, escrow=fleet.escrow)) as fleet:
        await escrowed(fleet, "dev-1", key, secret)  # rotated: a key with no TPM now
        _, receipt = await report(fleet, "dev-1", key, title="another crash")
        said: list[str] = []
        clock = ManualClock()
        task = asyncio.create_task(fetch(fleet, "dev-1", key, receipt.report_id, clock=clock, said=said))
        await clock.wait_for_sleeper()
        pending = [r for r in fleet.service.disk_keys(fleet.viewer, "dev-1").releases if r.state == "pending"]
        fleet.service.decide_key_release(fleet.user("bob"), pending[0].release_id, False)
        await clock.release()
        with pytest.raises(KeyRefused, match="a person refused"):
            await asyncio.wait_for(task, 60)

        view = fleet.service.revoke_disk_keys(fleet.user("alice"), "dev-1")
        assert sorted(k.state for k in view.keys) == ["revoked", "rotated"]
        with pytest.raises(KeyRefused, match="no escrowed disk key"):
            await fetch(fleet, "dev-1", key, receipt.report_id)


async def test_escrow_is_checked(fleet, secret):
    key = await enrolled(fleet)
    # Sealed to another escrow key than the server's.
    other = sealing.X25519PrivateKey.generate()
    from recovery_agent.protocol.wire import KeyEscrow

    msg = KeyEscrow(
        device_id="dev-1",
        slot=SLOT,
        sealed=sealing.seal(other.public_key(), secret, b"escrow|dev-1|7"),
        escrow_key=sealing.public_b64(other.public_key()),
        created_at=utcnow(),
    )
    async with DeviceClient(fleet.url, retry=FAST_RETRY) as c:
        with pytest.raises(ServerRefused, match="another escrow key"):
            await c.send_escrow(canonical_json(seal(msg, key)))
        # The server's key, but sealed for another device's slot: it does not open.
        msg = msg.model_copy(
            update={
                "escrow_key": fleet.escrow.public_b64,
                "sealed": sealing.seal(
                    sealing.public_from_b64(fleet.escrow.public_b64), secret, b"escrow|dev-2|7"
                ),
            }
        )
        with pytest.raises(ServerRefused, match="does not open"):
            await c.send_escrow(canonical_json(seal(msg, key)))
    # An escrow key not signed by the pinned server key is not used.
    from recovery_agent.errors import AgentError

    async with DeviceClient(fleet.url, retry=FAST_RETRY) as c:
        with pytest.raises(AgentError, match="not signed by the pinned server key"):
            await escrow(c, key, public_b64(SigningKey.generate().public), "dev-1", secret, SLOT)
    assert fleet.service.disk_keys(fleet.viewer, "dev-1").keys == []


async def test_the_same_escrow_again_is_the_same_key_and_a_replaced_one_is_a_refused_replay(fleet, secret):
    """A health report that resends what was delivered already changes nothing; an escrow that
    a newer one replaced, sent again, would bring back a key the disk no longer opens: 409."""
    from recovery_agent.diskkey import seal_escrow

    key = await enrolled(fleet)
    first = seal_escrow(key, public_b64(fleet.key.public), "dev-1", secret, SLOT, fleet.service.escrow_key())
    async with DeviceClient(fleet.url, retry=FAST_RETRY) as c:
        a = await c.send_escrow(first)
        again = await c.send_escrow(first)
        assert again["key_id"] == a["key_id"] and again["replaced"] == []
        newer = seal_escrow(
            key,
            public_b64(fleet.key.public),
            "dev-1",
            secrets.token_bytes(32),
            SLOT,
            fleet.service.escrow_key(),
        )
        b = await c.send_escrow(newer)
        assert b["replaced"] == [a["key_id"]]
        with pytest.raises(ServerRefused, match="replay"):
            await c.send_escrow(first)
    keys = fleet.service.disk_keys(fleet.viewer, "dev-1").keys
    assert [(k.key_id, k.state) for k in keys if k.state == "active"] == [(b["key_id"], "active")]
    assert kinds(fleet).count("disk_key.escrowed") == 2


# ---------------------------------------------------------------- never in clear


async def test_the_key_is_never_in_clear_on_the_wire_in_the_database_or_a_log(fleet, secret, caplog):
    """Escrow and release through a recording proxy; then the proxy's record of every request
    and answer, the database with its WAL and journal, and every log line are searched for
    the key, raw and as hex and base64 (standard and URL-safe)."""
    seen: list[bytes] = []

    async def proxy(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append(body)
        async with ClientSession() as s:
            async with s.request(
                request.method,
                fleet.url + request.path_qs,
                headers={
                    k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")
                },
                data=body,
            ) as r:
                answer = await r.read()
                seen.append(answer)
                return web.Response(body=answer, status=r.status, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy)
    mitm = TestServer(app, host="127.0.0.1")
    await mitm.start_server()
    caplog.set_level(logging.DEBUG)
    said: list[str] = []
    try:
        key = await enrolled(fleet)
        url = f"http://127.0.0.1:{mitm.port}"
        await escrowed(fleet, "dev-1", key, secret, tpm=True, url=url)
        _, receipt = await report(fleet, "dev-1", key)
        got = await fetch(fleet, "dev-1", key, receipt.report_id, url=url, said=said)
    finally:
        await mitm.close()
    assert got == secret, "the key made the trip"
    sealing.wipe(got)
    assert got == bytearray(32), "wiped in place"

    raw = bytes(secret)
    forms = [
        raw,
        raw.hex().encode(),
        raw.hex().upper().encode(),
        base64.b64encode(raw),
        base64.urlsafe_b64encode(raw),
        base64.b64encode(raw).rstrip(b"="),
        base64.urlsafe_b64encode(raw).rstrip(b"="),
    ]
    assert len(seen) >= 6, "escrow key, escrow, challenge and request, each with its answer"
    places = {f"wire {i}": blob for i, blob in enumerate(seen)}
    # (read while the server runs: its recent writes are still in the WAL)
    db = fleet.store_url
    if not db.startswith("postgresql"):
        for suffix in ("", "-wal", "-journal", "-shm"):
            path = Path(db + suffix)
            if path.exists():
                places[path.name] = path.read_bytes()
        assert any(name.endswith(".db") for name in places) and any(name.endswith("-wal") for name in places)
    for table in ("disk_keys", "key_releases", "events", "reports", "nonces"):
        places[f"table {table}"] = repr(
            [tuple(r) for r in fleet.store.all(f"SELECT * FROM {table}")]
        ).encode()
    places["logs"] = "\n".join(r.getMessage() for r in caplog.records).encode()
    places["agent"] = "\n".join(said).encode()
    for where, blob in places.items():
        for form in forms:
            assert form not in blob, f"the key appears in clear in {where}"
    assert any(b"key-escrow.v1" in blob for blob in seen), "the escrow travelled, sealed"
    assert any(b"key-release.v1" in blob for blob in seen), "the release travelled, sealed"


# ---------------------------------------------------------------- a real LUKS2 volume


async def test_recovery_agent_escrow_adds_a_keyslot_whose_released_key_opens_the_volume(
    fleet, machine, volume, capfd
):
    """recovery-agent escrow on the device: a fresh key in keyslot 7 (pinned argon2id cost),
    escrowed; in recovery the released key opens exactly that slot. The key was never
    written to a file: the machine's folder holds none of its forms afterwards."""
    from recovery_agent import luks
    from recovery_agent.cli import main as agent_main

    from .conftest import enrolled_settings, escrow_argv

    image, boot_key = volume
    settings = await enrolled_settings(fleet, machine, "dev-0001")
    code = await asyncio.to_thread(agent_main, escrow_argv(machine, image, boot_key, "--tpm-sealed"))
    out = capfd.readouterr().out
    assert code == 0, out
    assert "keyslot 7" in out
    [dk] = fleet.service.disk_keys(fleet.viewer, "dev-0001").keys
    assert dk.slot == 7 and dk.tpm_sealed

    key = SigningKey.load(settings.device_key)
    _, receipt = await report(fleet, "dev-0001", key)
    got = await fetch(fleet, "dev-0001", key, receipt.report_id)
    assert got is not None
    assert luks.check_key(image, got, slot=7), "the released key opens QMR's keyslot"
    assert not luks.check_key(image, bytes(32), slot=7)
    forms = [bytes(got), bytes(got).hex().encode(), base64.b64encode(bytes(got))]
    for path in machine.rglob("*"):
        if path.is_file():
            assert not any(f in path.read_bytes() for f in forms), f"the key is in {path}"
    assert not any(f.decode(errors="ignore") in out for f in forms[1:])
    sealing.wipe(got)


async def test_a_failed_escrow_takes_its_keyslot_back(fleet, machine, volume, capfd):
    """The server refuses (the device is not enrolled): the new keyslot is removed again."""
    from recovery_agent import luks
    from recovery_agent.cli import main as agent_main

    from .conftest import enrolled_settings, escrow_argv

    image, boot_key = volume
    await enrolled_settings(fleet, machine, "dev-0001")
    fleet.service.revoke_device(fleet.admin, "dev-0001")
    code = await asyncio.to_thread(
        agent_main,
        escrow_argv(machine, image, boot_key),
    )
    err = capfd.readouterr().err
    assert code != 0 and "revoked" in err
    # Slot 7 is free again: a key can be added there (it could not if the slot were taken).
    luks.add_keyslot(image, boot_key, secrets.token_bytes(32), 7)


async def test_recovery_admin_device_keys_shows_and_approves_a_release(fleet, secret):
    from .test_enrollment import admin

    key = await enrolled(fleet)
    await escrowed(fleet, "dev-1", key, secret)
    _, receipt = await report(fleet, "dev-1", key)
    pending = await post(fleet, await request_body(fleet, "dev-1", key, receipt.report_id))
    token = fleet.service.create_user(fleet.admin, "amy", "approver").token
    code, out, _ = await admin(fleet, token, "device", "keys", "dev-1")
    assert code == 0 and "release policy on" in out and "slot 7 active" in out
    assert pending.release_id in out and "pending" in out
    code, out, _ = await admin(fleet, token, "device", "keys", "dev-1", "--approve", pending.release_id)
    assert code == 0 and "approved" in out and "amy" in out
    assert await fetch(fleet, "dev-1", key, receipt.report_id) == secret
    viewer = fleet.service.create_user(fleet.admin, "val", "viewer").token
    code, _, err = await admin(fleet, viewer, "device", "keys", "dev-1", "--revoke")
    assert code == 2 and "needs the approver role" in err
    # The same view as `recovery-admin devices DEVICE --keys`.
    code, same, _ = await admin(fleet, token, "devices", "dev-1", "--keys")
    assert code == 0 and "slot 7 active" in same and pending.release_id in same
    code, _, err = await admin(fleet, token, "devices", "dev-1")
    assert code != 0 and "--keys" in err
