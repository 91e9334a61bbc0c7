"""Approvers sign remediations with their own keys; devices that pin those keys check the
signatures themselves (M of N), so the server alone, even compromised, cannot push a fix."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from recovery_agent.agent import Outcome, RecoveryAgent
from recovery_agent.layout import CHANNEL_DIR as CHANNELS
from recovery_agent.protocol.admin import Remediation
from recovery_agent.protocol.envelope import actions_digest, seal
from recovery_agent.protocol.keys import SigningKey, public_b64
from recovery_agent.protocol.wire import RemediationApproval, utcnow
from recovery_lab.dirdemo import BAD
from recovery_server.errors import BadRequest, Forbidden

from .clock import ManualClock
from .conftest import enrolled_settings, tree_snapshot
from .test_agent_flow import wait_for

ADMIN_CLI = [sys.executable, "-m", "recovery_server.admin_cli"]


def sign(key: SigningKey, rem: Remediation, approver: str, actions: list | None = None) -> dict:
    return seal(
        RemediationApproval(
            remediation_id=rem.remediation_id,
            actions_sha256=actions_digest(actions or rem.actions),
            approver=approver,
            approved_at=utcnow(),
        ),
        key,
    )


def remediation(fleet, incident_id: str, required: int = 2) -> Remediation:
    s = fleet.service.suggest_actions(fleet.user("oscar"), incident_id)
    return fleet.service.create_remediation(
        fleet.user("oscar"),
        title=s.title,
        actions=s.actions,
        incident_id=incident_id,
        required_approvals=required,
    )


async def pinned_agent(
    fleet, machine, keys, threshold: int, clock: ManualClock, **over
) -> tuple[RecoveryAgent, list[str]]:
    settings = await enrolled_settings(
        fleet,
        machine,
        approver_keys=[public_b64(k.public) for k in keys.values()],
        approver_threshold=threshold,
        **over,
    )
    agent = RecoveryAgent(settings, clock=clock)
    lines: list[str] = []
    agent.timeline.sink = lines.append
    return agent, lines


async def test_a_person_with_a_key_must_sign_and_sign_exactly_these_actions(fleet, keys, machine, clock):
    agent, _ = await pinned_agent(fleet, machine, keys, 0, clock, time_to_reboot_min=20)
    run = asyncio.create_task(agent.run())
    await wait_for(lambda: fleet.service.incidents(fleet.viewer))
    rem = remediation(fleet, fleet.service.incidents(fleet.viewer)[0].incident_id)
    with pytest.raises(Forbidden, match="approvals must be signed"):
        fleet.service.approve(fleet.user("alice"), rem.remediation_id)
    other = [{"type": "disable_driver", "name": "sensor"}]
    with pytest.raises(BadRequest, match="covers other actions"):
        fleet.service.approve(
            fleet.user("alice"), rem.remediation_id, sign(keys["alice"], rem, "alice", other)
        )
    with pytest.raises(BadRequest, match="does not verify|no signature by a trusted key"):
        fleet.service.approve(fleet.user("alice"), rem.remediation_id, sign(keys["bob"], rem, "alice"))
    assert fleet.count("approvals") == 0
    fleet.service.approve(fleet.user("alice"), rem.remediation_id, sign(keys["alice"], rem, "alice"))
    fleet.service.approve(fleet.user("bob"), rem.remediation_id, sign(keys["bob"], rem, "bob"))
    await clock.release()
    assert await asyncio.wait_for(run, 60) is Outcome.REMEDIATED
    envelope = json.loads(fleet.store.one("SELECT envelope FROM directives")["envelope"])
    import base64

    payload = json.loads(base64.b64decode(envelope["payload"]))
    assert len(payload["approvals"]) == 2


async def test_device_pinning_two_approvers_refuses_a_fix_only_one_signed(fleet, keys, machine, clock):
    fleet.service.create_user(fleet.admin, "carol", "approver")  # no key: her approval is not signed
    agent, lines = await pinned_agent(fleet, machine, keys, 2, clock, time_to_reboot_min=30)
    before = tree_snapshot(machine / "os")
    run = asyncio.create_task(agent.run())
    await wait_for(lambda: fleet.service.incidents(fleet.viewer))
    rem = remediation(fleet, fleet.service.incidents(fleet.viewer)[0].incident_id)
    fleet.service.approve(fleet.user("alice"), rem.remediation_id, sign(keys["alice"], rem, "alice"))
    fleet.service.approve(fleet.user("carol"), rem.remediation_id)
    await clock.release()
    assert await asyncio.wait_for(run, 60) is Outcome.NO_REMEDIATION
    assert any("carries 1 valid approver signature(s) and this device requires 2" in ln for ln in lines)
    assert tree_snapshot(machine / "os") == before


async def test_a_compromised_server_cannot_change_the_actions_people_signed(fleet, keys, machine, clock):
    """Someone with the server's database and key rewrites an approved remediation to delete
    a good channel file. The directive is validly signed by the server, but the approvers'
    signatures cover other actions: the device refuses it."""
    agent, lines = await pinned_agent(fleet, machine, keys, 2, clock, time_to_reboot_min=30)
    before = tree_snapshot(machine / "os")
    run = asyncio.create_task(agent.run())
    await wait_for(lambda: fleet.service.incidents(fleet.viewer))
    incident = fleet.service.incidents(fleet.viewer)[0].incident_id
    rem = remediation(fleet, incident)
    good = [
        f
        for f in fleet.service.incident(fleet.viewer, incident).reports[0].diagnostics.channel_files
        if f.path != f"{CHANNELS}/{BAD}"
    ][0]
    evil = json.dumps([{"type": "quarantine_file", "path": good.path, "sha256": good.sha256}])
    fleet.service.approve(fleet.user("alice"), rem.remediation_id, sign(keys["alice"], rem, "alice"))
    signed_by_bob = sign(keys["bob"], rem, "bob")
    fleet.service.approve(fleet.user("bob"), rem.remediation_id, signed_by_bob)
    # The attacker rewrites the approved remediation before any device was served.
    with fleet.store.tx() as tx:
        assert tx.one("SELECT count(*) FROM directives")[0] == 0
        tx.execute("UPDATE remediations SET actions = ? WHERE remediation_id = ?", evil, rem.remediation_id)
    await clock.release()
    assert await asyncio.wait_for(run, 60) is Outcome.NO_REMEDIATION
    assert any("approval is for other actions" in ln for ln in lines)
    assert tree_snapshot(machine / "os") == before


async def test_admin_cli_makes_a_key_and_signs_what_it_shows(fleet, machine, tmp_path, clock):
    """The agent's clock stands still while the CLI runs, however long that takes here."""
    agent_settings = await enrolled_settings(fleet, machine, time_to_reboot_min=30)
    run = asyncio.create_task(RecoveryAgent(agent_settings, clock=clock).run())
    await wait_for(lambda: fleet.service.incidents(fleet.viewer))
    rem = remediation(fleet, fleet.service.incidents(fleet.viewer)[0].incident_id, required=1)
    token = fleet.service.create_user(fleet.admin, "dora", "approver").token

    async def cli(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            *ADMIN_CLI,
            "--server",
            fleet.url,
            "--token",
            token,
            "--json",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode, out.decode()

    code, out = await cli("key", str(tmp_path / "dora.key"))
    assert code == 0 and json.loads(out)["key_id"] == SigningKey.load(tmp_path / "dora.key").key_id
    code, out = await cli("remediation", "approve", rem.remediation_id)
    assert code == 2 and "must be signed" in out
    code, out = await cli("remediation", "approve", rem.remediation_id, "--key", str(tmp_path / "dora.key"))
    assert code == 0, out
    await clock.release()
    assert await asyncio.wait_for(run, 60) is Outcome.REMEDIATED
    approvals = fleet.service.remediation(fleet.viewer, rem.remediation_id).approvals
    assert [(a.approver, a.signed) for a in approvals] == [("dora", True)]
    assert Path(tmp_path / "dora.key").stat().st_mode & 0o777 == 0o600
