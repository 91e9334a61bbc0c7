"""Test mode: a healthy machine's recovery path run on purpose, with the real agent against the
real server over HTTP on 127.0.0.1, on a directory laid out like the machine's disks.

An operator asks; the health report's answer arms the device; the test visit reports, gets a
test directive at once (no approval), writes only into the agent's own state, disarms and
resets GRUB's count; the next health report is the pass the fleet view shows."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pytest

from recovery_agent import testmode
from recovery_agent.agent import Outcome, RecoveryAgent, report_health
from recovery_agent.bootenv import BootEnv
from recovery_agent.cli import main as agent_main
from recovery_agent.layout import LAST_DIRECTIVE, RECOVERY_TESTS_DIR, STATE_DIR
from recovery_agent.protocol.envelope import DirectiveRejected, open_directive, seal
from recovery_agent.protocol.keys import SigningKey, key_id
from recovery_agent.protocol.wire import Directive, QuarantineFile, RecoveryTest, utcnow
from recovery_server.errors import BadRequest, Conflict, Forbidden, NotFound

from .conftest import enrolled_settings, tree_snapshot


def grub(machine) -> BootEnv:
    return BootEnv.read(machine / "esp/grub/grubenv")


def events(fleet, kind: str) -> list:
    return [e for e in fleet.service.events(fleet.viewer) if e.kind == kind]


async def healthy(fleet, machine, device_id: str = "dev-0001"):
    """An enrolled machine whose last boot was good (counters reset, crash records archived)."""
    settings = await enrolled_settings(fleet, machine, device_id)
    await report_health(settings, boot_id="boot-1")
    return settings


async def test_an_operators_request_runs_the_loop_and_changes_nothing_on_the_os(fleet, machine, clock):
    settings = await healthy(fleet, machine)
    [dev] = fleet.service.devices(fleet.viewer)
    assert dev.recovery_test_passed_at is None and dev.recovery_test_requested_at is None

    dev = fleet.service.request_recovery_test(fleet.user("oscar"), "dev-0001")
    assert dev.recovery_test_requested_at is not None
    answer = await report_health(settings, boot_id="boot-2")
    assert answer["recovery_test"] == "armed"
    env = grub(machine)
    assert env.get("recovery_test") == testmode.SERVER
    assert env.boot_count == env.boot_limit, "GRUB's next choice is the recovery environment"

    before = tree_snapshot(machine / "os", exclude=STATE_DIR)
    outcome = await asyncio.wait_for(RecoveryAgent(settings, clock=clock).run(), 60)
    assert outcome is Outcome.REMEDIATED
    assert tree_snapshot(machine / "os", exclude=STATE_DIR) == before, "nothing outside the agent's state"
    env = grub(machine)
    assert env.boot_count == 0 and "recovery_test" not in env, "disarmed: the next boot is the OS's"
    assert "recovery_attempts" not in env or env.recovery_attempts == 0, "a test is no recovery attempt"
    test_id = (machine / "os" / LAST_DIRECTIVE).read_text().strip()
    assert test_id.startswith("rt-")
    record = json.loads((machine / "os" / RECOVERY_TESTS_DIR / f"{test_id}.json").read_text())
    assert record == {"directive_id": test_id, "test_id": test_id}
    # No incident, nothing counted; the request is spent; not passed until the OS says so.
    assert fleet.service.incidents(fleet.viewer) == []
    [dev] = fleet.service.devices(fleet.viewer)
    assert dev.recovery_test_requested_at is None and dev.recovery_test_passed_at is None
    [visit] = events(fleet, "recovery_test.visit")
    assert visit.subject == test_id and json.loads(visit.detail)["requested_by"] == "oscar"
    [result] = events(fleet, "recovery_test.result")
    assert json.loads(result.detail)["outcome"] == "applied"

    answer = await report_health(settings, boot_id="boot-3")
    assert "recovery_test" not in answer, "the request was spent by the visit"
    [dev] = fleet.service.devices(fleet.viewer)
    assert dev.recovery_test_passed_at is not None and dev.state == "healthy"
    [passed] = events(fleet, "recovery_test.passed")
    assert passed.subject == test_id
    assert fleet.service.verify_audit(fleet.viewer).ok


async def test_a_locally_armed_test_needs_no_request(fleet, machine, clock, capsys):
    settings = await healthy(fleet, machine)
    config = str(machine / "recovery/agent.json")
    assert agent_main(["--config", config, "test-mode", "--status"]) == 0
    assert "no recovery test is armed" in capsys.readouterr().out
    assert agent_main(["--config", config, "test-mode"]) == 0
    assert "recovery test armed" in capsys.readouterr().out
    assert grub(machine).get("recovery_test") == testmode.LOCAL
    assert await asyncio.wait_for(RecoveryAgent(settings, clock=clock).run(), 60) is Outcome.REMEDIATED
    [visit] = events(fleet, "recovery_test.visit")
    assert json.loads(visit.detail)["requested_by"] == "the device"
    await report_health(settings, boot_id="boot-2")
    assert fleet.service.devices(fleet.viewer)[0].recovery_test_passed_at is not None


async def test_cancel_on_the_device_and_on_the_server(fleet, machine, capsys):
    settings = await healthy(fleet, machine)
    config = str(machine / "recovery/agent.json")
    agent_main(["--config", config, "test-mode"])
    assert agent_main(["--config", config, "test-mode", "--cancel"]) == 0
    assert "cancelled" in capsys.readouterr().out
    env = grub(machine)
    assert "recovery_test" not in env and env.boot_count == 0

    fleet.service.request_recovery_test(fleet.user("oscar"), "dev-0001")
    dev = fleet.service.request_recovery_test(fleet.user("oscar"), "dev-0001", cancel=True)
    assert dev.recovery_test_requested_at is None
    assert "recovery_test" not in await report_health(settings, boot_id="boot-2")
    with pytest.raises(Conflict, match="no recovery test requested"):
        fleet.service.request_recovery_test(fleet.user("oscar"), "dev-0001", cancel=True)
    assert [e.kind for e in fleet.service.events(fleet.viewer) if e.kind.startswith("recovery_test.")] == [
        "recovery_test.requested",
        "recovery_test.cancelled",
    ]


async def test_who_may_ask_and_for_which_device(fleet, machine):
    await healthy(fleet, machine)
    with pytest.raises(Forbidden):
        fleet.service.request_recovery_test(fleet.viewer, "dev-0001")
    with pytest.raises(NotFound, match="no device dev-nope"):
        fleet.service.request_recovery_test(fleet.user("oscar"), "dev-nope")
    fleet.service.revoke_device(fleet.admin, "dev-0001")
    with pytest.raises(Conflict, match="revoked"):
        fleet.service.request_recovery_test(fleet.user("oscar"), "dev-0001")


async def test_a_failed_test_visit_disarms_and_boots_the_os(fleet, machine, clock):
    """The server refuses the visit (here: the device was revoked): the test fails, and the
    machine goes back to its OS, which was never broken."""
    settings = await healthy(fleet, machine)
    testmode.arm(settings.grubenv, testmode.LOCAL)
    fleet.service.revoke_device(fleet.admin, "dev-0001")
    assert await asyncio.wait_for(RecoveryAgent(settings, clock=clock).run(), 60) is Outcome.NO_REMEDIATION
    env = grub(machine)
    assert env.boot_count == 0 and "recovery_test" not in env
    assert not (machine / "os" / RECOVERY_TESTS_DIR).exists()
    assert events(fleet, "recovery_test.visit") == []


def test_a_remediation_cannot_hold_the_test_action(fleet):
    with pytest.raises(BadRequest, match="recovery_test"):
        fleet.service.create_remediation(
            fleet.user("oscar"),
            title="sneaky",
            actions=[{"type": "recovery_test", "test_id": "rt-000000000000"}],
            incident_id=None,
        )


def _directive(key: SigningKey, actions) -> dict:
    now = utcnow()
    return seal(
        Directive(
            directive_id="rt-1",
            device_id="dev-1",
            agent_nonce="n" * 22,
            diagnostics_sha256="0" * 64,
            remediation_id="rt-1",
            issued_at=now,
            expires_at=now + timedelta(hours=1),
            actions=actions,
        ),
        key,
    )


@pytest.mark.parametrize(
    "test_visit, actions, refused",
    [
        # A test visit takes the test action alone, with no approver, even where approvers are pinned.
        (True, [RecoveryTest(test_id="rt-1")], None),
        (True, [RecoveryTest(test_id="rt-1"), QuarantineFile(path="etc/x", sha256="1" * 64)], "test visit"),
        (True, [QuarantineFile(path="etc/x", sha256="1" * 64)], "test visit"),
        # A crash visit never takes a test directive (it would stand for a fix).
        (False, [RecoveryTest(test_id="rt-1")], "did not arm test mode"),
    ],
)
def test_the_device_takes_a_test_directive_only_on_a_test_visit(test_visit, actions, refused):
    server, approver = SigningKey.generate(), SigningKey.generate()
    env = _directive(server, actions)
    check = lambda: open_directive(
        env,
        {server.key_id: server.public},
        device_id="dev-1",
        agent_nonce="n" * 22,
        diagnostics_sha256="0" * 64,
        now=utcnow(),
        approver_keyring={key_id(approver.public): approver.public},
        approver_threshold=1,
        test_visit=test_visit,
    )
    if refused is None:
        assert check().message.actions == actions
    else:
        with pytest.raises(DirectiveRejected, match=refused):
            check()


async def test_recovery_admin_asks_for_a_test_and_lists_who_passed(fleet, machine, clock):
    from .test_enrollment import admin

    settings = await healthy(fleet, machine)
    token = fleet.service.create_user(fleet.admin, "olive", "operator").token
    code, out, _ = await admin(fleet, token, "devices")
    assert code == 0 and "never passed" in out
    code, _, _ = await admin(fleet, token, "device", "test", "dev-0001")
    assert code == 0
    code, out, _ = await admin(fleet, token, "devices")
    assert "never passed (test requested)" in out
    await report_health(settings, boot_id="boot-2")
    assert await asyncio.wait_for(RecoveryAgent(settings, clock=clock).run(), 60) is Outcome.REMEDIATED
    await report_health(settings, boot_id="boot-3")
    code, out, _ = await admin(fleet, token, "devices")
    assert "passed 20" in out and "requested" not in out
