"""Enrollment cannot be used to steer a rollout: what a stranger holding only the enrollment
token can do, over the real HTTP API, and what an admin does about it.

The attacks: fake devices that report the incident's crash, are served the fix and report
healthy boots (to complete a rollout) or failures (to halt one); one device reporting again
and again to count many times; a stranger taking a real machine's device id first; tokens
used after they expired, were used up or revoked; a revoked device that keeps talking. Then
the admin's side (token and device commands, on the API and ``recovery-admin``) and the
upgrade of a version-2 database.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest

from recovery_agent.protocol.admin import AdminClient, RolloutPlan
from recovery_agent.protocol.client import DeviceClient, ServerRefused
from recovery_agent.protocol.keys import SigningKey, public_b64
from recovery_server import admin_cli
from recovery_server.access import console
from recovery_server.service import RecoveryService
from recovery_server.store import Store

from .conftest import FAST_RETRY, postgres_schema
from .fleetsim import BAD_PATH, BAD_SHA, HttpDevice

ACTIONS = [{"type": "quarantine_file", "path": BAD_PATH, "sha256": BAD_SHA}]
MakeDevice = Callable[..., HttpDevice]


@dataclass
class People:
    """The fleet's people on the admin API: an admin, an operator who writes fixes and sets
    rollouts, an approver who approves them."""

    admin: AdminClient
    operator: AdminClient
    approver: AdminClient


@asynccontextmanager
async def people(fleet) -> AsyncIterator[People]:
    tokens = {
        role: fleet.service.create_user(fleet.admin, name, role).token
        for name, role in (("ada", "admin"), ("otto", "operator"), ("bea", "approver"))
    }
    async with (
        AdminClient(fleet.url, tokens["admin"], retry=FAST_RETRY) as admin,
        AdminClient(fleet.url, tokens["operator"], retry=FAST_RETRY) as operator,
        AdminClient(fleet.url, tokens["approver"], retry=FAST_RETRY) as approver,
    ):
        yield People(admin, operator, approver)


@asynccontextmanager
async def devices(fleet) -> AsyncIterator[MakeDevice]:
    """Make devices that talk to ``fleet`` over HTTP; each pins the server's key."""
    ring = {fleet.key.key_id: fleet.key.public}
    async with DeviceClient(fleet.url, retry=FAST_RETRY) as client:

        def make(device_id: str, key: SigningKey | None = None) -> HttpDevice:
            return HttpDevice(device_id, client, ring, key or SigningKey.generate())

        yield make


async def crashed(make: MakeDevice, token: str, names: list[str]) -> list[HttpDevice]:
    """Real machines: enrolled while healthy, then each reports the channel-file crash."""
    out = []
    for name in names:
        dev = make(name)
        assert (await dev.enroll(token))["status"] == "enrolled"
        await dev.report()
        out.append(dev)
    return out


async def start_rollout(p: People, incident_id: str, **plan) -> str:
    """The operator writes the fix and sets a one-wave rollout; the approver approves: from now
    on every device of the incident is served."""
    rem = await p.operator.create_remediation("quarantine 291", ACTIONS, incident_id)
    ro = await p.operator.create_rollout(
        rem.remediation_id, RolloutPlan.model_validate({"waves": [{"name": "all", "percent": 100}], **plan})
    )
    await p.approver.approve(rem.remediation_id)
    return ro.rollout_id


async def refused(call, status: int, match: str) -> str:
    with pytest.raises(ServerRefused, match=match) as e:
        await call
    assert e.value.status == status, e.value.message
    return e.value.message


# ---------------------------------------------------------------- steering a rollout


async def test_ninety_fake_devices_cannot_complete_a_rollout(fleet):
    """With the enrollment token alone, 90 fake devices report the incident's crash, are
    served the fix and report healthy boots. They enrolled after the rollout started: they
    are served (a new machine may be real) but the gate does not move. The real machines do."""
    async with people(fleet) as p, devices(fleet) as make:
        real = await crashed(make, fleet.enrollment_token, [f"host-{i:02d}" for i in range(5)])
        incident = real[0].receipt.incident_id
        rollout_id = await start_rollout(p, incident, min_devices=5, halt_min_devices=5)

        for i in range(90):
            fake = make(f"fake-{i:02d}")
            await fake.enroll(fleet.enrollment_token)
            assert (await fake.report()).incident_id == incident
            assert await fake.poll() is not None, "served: for all the server knows, a new machine"
            await fake.recover()

        ro = await p.admin.rollout(rollout_id)
        assert (ro.state, ro.current_wave) == ("active", 0), ro.reason
        [wave] = ro.waves
        assert (wave.served, wave.counted, wave.succeeded, wave.pending) == (90, 0, 0, 0)
        assert ro.gate == "0 of 5 devices finished (90 more served, not counted)"

        for dev in real:
            assert await dev.poll() is not None
            await dev.recover()
        ro = await p.admin.rollout(rollout_id)
        assert ro.state == "completed", ro.reason
        assert (ro.waves[0].served, ro.waves[0].counted, ro.waves[0].succeeded) == (95, 5, 5)


async def test_three_fake_failures_cannot_halt_a_rollout(fleet):
    """Three fake devices, enrolled with the token after the rollout started, report that the
    fix failed and crash again: the rollout goes on, and completes with the real machines."""
    async with people(fleet) as p, devices(fleet) as make:
        real = await crashed(make, fleet.enrollment_token, [f"host-{i:02d}" for i in range(5)])
        rollout_id = await start_rollout(
            p, real[0].receipt.incident_id, min_devices=5, halt_failure_rate=0.2, halt_min_devices=3
        )
        for i in range(3):
            fake = make(f"fake-{i}")
            await fake.enroll(fleet.enrollment_token)
            await fake.report()
            assert await fake.poll() is not None
            await fake.fail()
            await fake.report()  # and "crashed again"

        ro = await p.admin.rollout(rollout_id)
        assert ro.state == "active", ro.reason
        assert (ro.waves[0].served, ro.waves[0].counted, ro.waves[0].failed) == (3, 0, 0)

        for dev in real:
            assert await dev.poll() is not None
            await dev.recover()
        assert (await p.admin.rollout(rollout_id)).state == "completed"


async def test_a_device_counts_once_however_often_it_reports(fleet):
    """A device the rollout counts (enrolled before it started) reports the crash three times,
    is served three times and sends healthy boots for each, and more: one success. Another
    fails three times: one failure. Neither completes nor halts the rollout."""
    async with people(fleet) as p, devices(fleet) as make:
        one, two = await crashed(make, fleet.enrollment_token, ["host-1", "host-2"])
        rollout_id = await start_rollout(
            p, one.receipt.incident_id, min_devices=3, halt_failure_rate=0.2, halt_min_devices=3
        )
        for attempt in range(3):
            if attempt:
                await one.report()
            assert await one.poll() is not None
            await one.recover()
        for _ in range(3):
            await one.healthy()  # the same directive, another boot
        for attempt in range(3):
            if attempt:
                await two.report()
            assert await two.poll() is not None
            await two.fail()

        ro = await p.admin.rollout(rollout_id)
        assert ro.state == "active", ro.reason
        wave = ro.waves[0]
        assert (wave.served, wave.counted, wave.succeeded, wave.failed) == (6, 2, 1, 1)
        assert ro.gate == "2 of 3 devices finished (4 more served, not counted)"


async def test_revoking_devices_takes_them_out_of_the_gate(fleet):
    """Fakes enrolled before the rollout started count, and can halt it: that is the window the
    token's expiry and uses bound. The admin sees which token enrolled them, revokes them, and
    resumes: the real machines complete the rollout."""
    async with people(fleet) as p, devices(fleet) as make:
        stolen = await p.admin.create_enrollment_token("stolen", max_uses=3)
        fakes = await crashed(make, stolen.token, ["fake-1", "fake-2", "fake-3"])
        real = await crashed(make, fleet.enrollment_token, [f"host-{i}" for i in range(3)])
        rollout_id = await start_rollout(
            p, real[0].receipt.incident_id, min_devices=3, halt_failure_rate=0.2, halt_min_devices=3
        )
        for fake in fakes:
            assert await fake.poll() is not None
            await fake.fail()
        assert (await p.admin.rollout(rollout_id)).state == "halted"

        suspects = [d.device_id for d in await p.admin.devices() if d.enrolled_with == stolen.token_id]
        assert suspects == ["fake-1", "fake-2", "fake-3"]
        for device_id in suspects:
            assert (await p.admin.revoke_device(device_id)).revoked_at is not None
        ro = await p.admin.rollout(rollout_id)
        assert (ro.waves[0].served, ro.waves[0].counted, ro.waves[0].failed) == (3, 0, 0)

        await p.approver.set_rollout_state(rollout_id, "resume")
        for dev in real:
            assert await dev.poll() is not None
            await dev.recover()
        assert (await p.admin.rollout(rollout_id)).state == "completed"


# ---------------------------------------------------------------- device ids


async def test_a_squatted_device_id_is_given_back_by_an_admin(fleet):
    """A stranger with the token enrolls host-07 before the real host-07 does. The real one is
    refused with the fix in the message; the admin gives the id the real key; the stranger's
    key stops working, and what it was served no longer counts."""
    async with people(fleet) as p, devices(fleet) as make:
        squatter, real = make("host-07"), make("host-07")
        await squatter.enroll(fleet.enrollment_token)
        message = await refused(real.enroll(fleet.enrollment_token), 409, "enrolled with another key")
        fix = f"recovery-admin device rekey host-07 --public-key {real.public_key}"
        assert fix in message
        # Replaced over the network by nobody: the squatter still holds the id.
        assert [d.key_id for d in await p.admin.devices()] == [squatter.key.key_id]

        device = await p.admin.replace_device_key("host-07", real.public_key)
        assert device.key_id == real.key.key_id and device.enrolled_with is None
        assert (await real.enroll(fleet.enrollment_token))["status"] == "already_enrolled"
        await real.report()
        await refused(squatter.report(), 401, "no signature by a trusted key")
        [entry] = [e for e in await p.admin.events() if e.kind == "device.key_replaced"]
        assert entry.actor == "ada" and entry.device_id == "host-07"
        assert json.loads(entry.detail)["old_key_id"] == squatter.key.key_id


async def test_a_reinstalled_machine_hears_the_fix_from_recovery_agent_enroll(fleet, tmp_path, capsys):
    """The real agent's command line shows the refusal in one line, with the command that
    fixes it and this machine's key in it."""
    from recovery_agent.cli import main

    from .test_agent_cli import one_line_error, settings_file

    async with devices(fleet) as make:
        await make("dev-0001").enroll(fleet.enrollment_token)  # the machine before its reinstall
    config = settings_file(tmp_path, server_url=fleet.url)
    code = await asyncio.to_thread(
        main, ["--config", str(config), "enroll", "--token", fleet.enrollment_token]
    )
    assert code == 2
    key = SigningKey.load(config.parent / "device.key")
    assert f"recovery-admin device rekey dev-0001 --public-key {public_b64(key.public)}" in one_line_error(
        capsys
    )


async def test_a_revoked_device_is_refused_everything(fleet):
    """After an admin revokes it, every message the device signs is refused, and so are its
    polls; it cannot enroll its way back. An admin gives it a key again to let it back in."""
    async with people(fleet) as p, devices(fleet) as make:
        dev, other = await crashed(make, fleet.enrollment_token, ["host-1", "host-2"])
        rollout_id = await start_rollout(p, dev.receipt.incident_id, min_devices=2)
        assert await dev.poll() is not None
        before = fleet.count("reports"), fleet.count("results"), fleet.count("health")

        revoked = await p.admin.revoke_device("host-1")
        assert revoked.revoked_at is not None
        await refused(p.admin.revoke_device("host-1"), 409, "revoked already, by ada")
        await refused(dev.recover(), 401, "device host-1 was revoked by ada")
        await refused(dev.healthy(), 401, "was revoked")
        await refused(dev.poll(), 401, "was revoked")
        await refused(dev.report(), 401, "was revoked")
        message = await refused(dev.enroll(fleet.enrollment_token), 401, "was revoked")
        assert f"recovery-admin device rekey host-1 --public-key {dev.public_key}" in message
        assert (fleet.count("reports"), fleet.count("results"), fleet.count("health")) == before
        ro = await p.admin.rollout(rollout_id)
        assert (ro.waves[0].served, ro.waves[0].counted) == (1, 0), "its directive counts no more"

        await other.poll()
        await other.recover()  # the rest of the fleet is unaffected
        await p.admin.replace_device_key("host-1", dev.public_key)
        await dev.report()
        assert await dev.poll() is not None
        kinds = [e.kind for e in await p.admin.events(device="host-1")]
        assert "device.revoked" in kinds and "device.key_replaced" in kinds


# ---------------------------------------------------------------- enrollment tokens


def stop_the_clock(fleet) -> datetime:
    """The server's clock stands still from now on (the test moves it)."""
    now = fleet.service.now()
    fleet.service.clock = lambda: now
    return now


async def test_an_expired_token_enrolls_nobody(fleet):
    now = stop_the_clock(fleet)
    async with people(fleet) as p, devices(fleet) as make:
        token = await p.admin.create_enrollment_token("batch-1", expires_in_s=3600)
        assert token.expires_at == now + timedelta(hours=1)
        await make("host-1").enroll(token.token)
        fleet.service.clock = lambda: now + timedelta(minutes=59, seconds=59)
        await make("host-2").enroll(token.token)
        fleet.service.clock = lambda: now + timedelta(hours=1)
        await refused(make("host-3").enroll(token.token), 401, f"{token.token_id} \\(batch-1\\) expired")
        [info] = [t for t in await p.admin.enrollment_tokens() if t.token_id == token.token_id]
        assert (info.state, info.used) == ("expired", 2)
    assert [d.device_id for d in fleet.service.devices(fleet.viewer)] == ["host-1", "host-2"]


async def test_a_token_enrolls_as_many_devices_as_it_allows(fleet):
    async with people(fleet) as p, devices(fleet) as make:
        token = await p.admin.create_enrollment_token("two", max_uses=2)
        first = make("host-1")
        await first.enroll(token.token)
        await make("host-2").enroll(token.token)
        assert (await first.enroll(token.token))["status"] == "already_enrolled", "spends no use"
        await refused(make("host-3").enroll(token.token), 401, "has enrolled the 2 devices it allowed")
        [info] = [t for t in await p.admin.enrollment_tokens() if t.token_id == token.token_id]
        assert (info.state, info.used, info.max_uses) == ("used_up", 2, 2)
    assert fleet.count("devices") == 2


async def test_a_revoked_token_enrolls_nobody(fleet):
    async with people(fleet) as p, devices(fleet) as make:
        token = await p.admin.create_enrollment_token("leaked")
        await make("host-1").enroll(token.token)
        info = await p.admin.revoke_enrollment_token(token.token_id)
        assert (info.state, info.revoked_by) == ("revoked", "ada")
        await refused(make("host-2").enroll(token.token), 401, "was revoked by ada")
        await refused(p.admin.revoke_enrollment_token(token.token_id), 409, "revoked already")
        await refused(p.admin.revoke_enrollment_token("et-000000000000"), 404, "enrollment-token list")
        kinds = [(e.kind, e.subject) for e in await p.admin.events()]
        assert ("enrollment_token.created", token.token_id) in kinds
        assert ("enrollment_token.revoked", token.token_id) in kinds
        # The device it enrolled stays: revoking devices is a separate, deliberate act.
        assert [d.device_id for d in await p.admin.devices()] == ["host-1"]


async def test_token_lifetimes_are_bounded(fleet):
    now = stop_the_clock(fleet)
    async with people(fleet) as p:
        default = await p.admin.create_enrollment_token()
        assert default.expires_at == now + timedelta(days=1)
        assert default.max_uses is None
        for body in ({"expires_in_s": 10}, {"expires_in_s": 366 * 86400}, {"max_uses": 0}):
            await refused(p.admin.call("POST", "/enrollment-tokens", body), 400, "EnrollmentTokenRequest")


# ---------------------------------------------------------------- recovery-admin


async def admin(fleet, token: str, *argv: str) -> tuple[int, str, str]:
    """``recovery-admin ARGV`` against ``fleet``, in a thread (it runs its own event loop)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return admin_cli.main(["--server", fleet.url, "--token", token, *argv])

    code = await asyncio.to_thread(run)
    return code, out.getvalue(), err.getvalue()


async def test_recovery_admin_manages_tokens_and_devices(fleet):
    now = stop_the_clock(fleet)
    token = fleet.service.create_user(fleet.admin, "ada", "admin").token
    code, out, _ = await admin(
        fleet,
        token,
        "enrollment-token",
        "create",
        "--label",
        "lab-7",
        "--expires",
        "2h",
        "--uses",
        "3",
        "--json",
    )
    assert code == 0
    made = json.loads(out)
    assert made["label"] == "lab-7" and made["max_uses"] == 3 and made["token"].startswith("enr_")
    assert datetime.fromisoformat(made["expires_at"]) == now + timedelta(hours=2)
    # The command's older form still makes one.
    code, out, _ = await admin(fleet, token, "enrollment-token", "--label", "old-form", "--json")
    assert code == 0 and json.loads(out)["label"] == "old-form"

    code, out, _ = await admin(fleet, token, "enrollment-token", "list")
    assert code == 0
    [line] = [x for x in out.splitlines() if made["token_id"] in x]
    assert "lab-7" in line and "active" in line and "0/3" in line
    assert made["token"] not in out, "a token is shown once, when made"

    code, _, err = await admin(fleet, token, "enrollment-token", "create", "--expires", "soon")
    assert code == 2 and "--expires 'soon': give a duration such as 30m, 24h or 7d" in err

    async with devices(fleet) as make:
        dev = make("host-1")
        await dev.enroll(made["token"])
    code, out, _ = await admin(fleet, token, "enrollment-token", "revoke", made["token_id"])
    assert code == 0 and '"state": "revoked"' in out

    code, out, _ = await admin(fleet, token, "devices")
    assert code == 0 and made["token_id"] in out
    code, out, _ = await admin(fleet, token, "device", "revoke", "host-1")
    assert code == 0
    code, out, _ = await admin(fleet, token, "device", "list")
    [line] = [x for x in out.splitlines() if x.startswith("host-1")]
    assert "revoked" in line
    new = SigningKey.generate()
    code, out, _ = await admin(
        fleet, token, "device", "rekey", "host-1", "--public-key", public_b64(new.public)
    )
    assert code == 0 and json.loads(out)["key_id"] == new.key_id and json.loads(out)["revoked_at"] is None
    code, _, err = await admin(
        fleet, token, "device", "rekey", "nobody", "--public-key", public_b64(new.public)
    )
    assert code == 2 and "no device nobody" in err


# ---------------------------------------------------------------- upgrading a version-2 database


def _version_2_database(execute: Callable[[str], None]) -> None:
    """Schema version 2 as it was released, with a fleet in it: a token that never expires and
    one that does, devices enrolled before and after a rollout, and that rollout's directives
    (host-1 served twice)."""
    from recovery_server import store as store_mod

    for statement in store_mod._SCHEMA.split(";"):
        if statement.strip():
            execute(statement)
    for statement in store_mod._MIGRATIONS[2]:
        execute(statement)
    t = "'2026-01-01T00:00:00Z'"
    execute("INSERT INTO schema_meta VALUES ('version', '2')")
    execute(f"INSERT INTO users(name, role, token_sha256, created_at) VALUES ('ada', 'admin', 'x', {t})")
    execute(f"INSERT INTO enrollment_tokens VALUES ('{'a' * 64}', 'forever', 'ada', {t}, NULL)")
    execute(
        f"INSERT INTO enrollment_tokens VALUES ('{'b' * 64}', 'dated', 'ada', {t}, '2099-01-01T00:00:00Z')"
    )
    events = [
        (1, "device.enrolled", "host-1", None),
        (2, "device.enrolled", "host-2", None),
        (3, "rollout.created", None, "ro-1"),
        (4, "device.enrolled", "late-1", None),
    ]
    for seq, kind, device, subject in events:
        execute(
            "INSERT INTO events(seq, at, kind, actor, device_id, subject, prev_hash, hash) VALUES "
            f"({seq}, {t}, '{kind}', 'x', {repr(device) if device else 'NULL'}, "
            f"{repr(subject) if subject else 'NULL'}, 'p', 'h')"
        )
    for i, device in enumerate(("host-1", "host-2", "late-1")):
        execute(
            f"INSERT INTO devices(device_id, public_key, key_id, enrolled_at) VALUES "
            f"('{device}', 'k{i}', 'kid{i}', {t})"
        )
    execute(
        f"INSERT INTO incidents VALUES ('INC-1', 's', 'kernel_panic', 'x', NULL, NULL, NULL, {t}, {t}, 4)"
    )
    execute(
        "INSERT INTO remediations(remediation_id, incident_id, title, actions, author, status, created_at) "
        f"VALUES ('rem-1', 'INC-1', 'q', '[]', 'ada', 'approved', {t})"
    )
    plan = RolloutPlan.model_validate({"waves": [{"name": "all", "percent": 100}]}).model_dump_json()
    execute(
        "INSERT INTO rollouts(rollout_id, remediation_id, plan, state, wave_started_at, created_by, "
        f"created_at) VALUES ('ro-1', 'rem-1', '{plan}', 'active', {t}, 'ada', {t})"
    )
    served = [("d1", "host-1", "10"), ("d2", "host-1", "20"), ("d3", "host-2", "10"), ("d4", "late-1", "10")]
    for directive, device, minute in served:
        execute(
            f"INSERT INTO reports VALUES ('r-{directive}', '{device}', 'INC-1', 'sha-{directive}', "
            f"'n', 'p', {t}, '{{}}', '{{}}')"
        )
        execute(
            "INSERT INTO directives(directive_id, device_id, report_id, remediation_id, issued_at, "
            f"expires_at, envelope, wave) VALUES ('{directive}', '{device}', 'r-{directive}', 'rem-1', "
            f"'2026-01-01T00:{minute}:00Z', '2026-01-01T01:00:00Z', '{{}}', 0)"
        )


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_version_2_database_is_migrated_in_place(backend, tmp_path):
    """Tokens get ids and a use count, the one that never expired is expired; devices and the
    rollout get their place in the audit log's order; each device's first directive of the
    rollout counts, if the device enrolled before the rollout started."""
    if backend == "sqlite":
        path = tmp_path / "v2.db"
        db = sqlite3.connect(path)
        _version_2_database(db.execute)
        db.commit()
        db.close()
        check_migrated(Store(path))
        return
    import psycopg

    with postgres_schema() as url:
        with psycopg.connect(url, autocommit=True) as db:
            _version_2_database(db.execute)
        check_migrated(Store(url))


def check_migrated(s: Store) -> None:
    from recovery_server.devices import token_id_of

    try:
        from recovery_server.store import SCHEMA_VERSION

        assert s.one("SELECT value FROM schema_meta WHERE key = 'version'")[0] == str(SCHEMA_VERSION)
        assert s.all("SELECT * FROM device_files") == [], "version 4: the fleet's inventory tables"
        assert all(r[0] is None for r in s.all("SELECT inventory_digest FROM devices")), "none sent yet"
        tokens = {r["label"]: r for r in s.all("SELECT * FROM enrollment_tokens")}
        assert tokens["forever"]["token_id"] == token_id_of("a" * 64) == "et-aaaaaaaaaaaa"
        assert tokens["forever"]["expires_at"] == "2026-01-01T00:00:00Z", "never-expiring tokens end"
        assert tokens["dated"]["expires_at"] == "2099-01-01T00:00:00Z"
        assert all(r["used"] == 0 and r["max_uses"] is None for r in tokens.values())
        seqs = {r["device_id"]: r["enrolled_seq"] for r in s.all("SELECT * FROM devices")}
        assert seqs == {"host-1": 1, "host-2": 2, "late-1": 4}
        assert s.scalar("SELECT started_seq FROM rollouts") == 3
        counted = {r[0]: r[1] for r in s.all("SELECT directive_id, counted FROM directives")}
        assert counted == {"d1": 1, "d2": 0, "d3": 1, "d4": 0}
        # The server reads it: the views of tokens and of the rollout in progress.
        svc = RecoveryService(store=s, server_key=SigningKey.generate())
        states = {t.label: t.state for t in svc.enrollment_tokens(console("test"))}
        assert states == {"forever": "expired", "dated": "active"}
        [wave] = svc.rollout(console("test"), "ro-1").waves
        assert (wave.served, wave.counted, wave.pending) == (4, 2, 2)
    finally:
        s.close()
