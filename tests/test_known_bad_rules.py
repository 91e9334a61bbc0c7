"""Known-bad rules: content judged bad once (approved M of N, each approver signing the rule),
then fixed in every later incident that reports it with no new approval; revoked, it fixes
nothing more. The real agent, pinning the approvers' keys, checks the rule's signatures and
that the directive's actions follow from it."""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import timedelta

import pytest

from recovery_agent.agent import Outcome, RecoveryAgent
from recovery_agent.layout import CHANNEL_DIR
from recovery_agent.protocol.envelope import DirectiveRejected, open_directive, rule_digest, seal
from recovery_agent.protocol.keys import SigningKey, key_id, public_b64
from recovery_agent.protocol.wire import (
    Directive,
    KnownBadRule,
    QuarantineFile,
    RuleApproval,
    utcnow,
)
from recovery_lab.dirdemo import BAD, GOOD, REAL_PANIC_LOG, make_machine_dir
from recovery_server.errors import BadRequest, Conflict, Forbidden

from .conftest import enrolled_settings
from .test_agent_flow import wait_for

PATTERN = f"{CHANNEL_DIR}/C-00000291*.sys"


def signed(key: SigningKey, rule, approver: str) -> dict:
    wire = KnownBadRule(
        rule_id=rule.rule_id, title=rule.title, path_pattern=rule.path_pattern, sha256=rule.sha256
    )
    return seal(
        RuleApproval(
            rule_id=rule.rule_id, rule_sha256=rule_digest(wire), approver=approver, approved_at=utcnow()
        ),
        key,
    )


def machine_crashing_in(tmp_path, name: str, function: str):
    """A machine with the bad channel file whose driver crashes in ``function``: another
    crash signature, so another incident, with the same content."""
    log = tmp_path / f"{name}.txt"
    log.write_text(REAL_PANIC_LOG.read_text().replace("sensor_parse_channel", function))
    return make_machine_dir(tmp_path / name, panic_log=log)


def bad_sha(machine) -> str:
    return hashlib.sha256((machine / "os" / CHANNEL_DIR / BAD).read_bytes()).hexdigest()


async def pinned(fleet, machine, keys, device_id: str, clock, **over):
    settings = await enrolled_settings(
        fleet,
        machine,
        device_id,
        approver_keys=[public_b64(k.public) for k in keys.values()],
        approver_threshold=2,
        **over,
    )
    agent = RecoveryAgent(settings, clock=clock)
    lines: list[str] = []
    agent.timeline.sink = lines.append
    return agent, lines


def publish(fleet, keys, sha: str, **extra):
    """oscar publishes the rule; alice and bob sign it."""
    rule = fleet.service.create_rule(
        fleet.user("oscar"),
        {
            "title": "channel file 291, build 32",
            "path_pattern": PATTERN,
            "sha256": sha,
            "required_approvals": 2,
        }
        | extra,
    )
    assert rule.status == "pending"
    fleet.service.approve_rule(fleet.user("alice"), rule.rule_id, signed(keys["alice"], rule, "alice"))
    rule = fleet.service.approve_rule(fleet.user("bob"), rule.rule_id, signed(keys["bob"], rule, "bob"))
    assert rule.status == "active"
    return rule


def kinds(fleet) -> list[str]:
    return [e.kind for e in fleet.service.events(fleet.viewer)]


async def test_a_second_incident_with_the_same_content_is_fixed_with_no_new_approval(
    fleet, keys, tmp_path, clock
):
    first = machine_crashing_in(tmp_path, "first", "sensor_parse_channel")
    second = machine_crashing_in(tmp_path, "second", "sensor_verify_channel")
    third = machine_crashing_in(tmp_path, "third", "sensor_apply_channel")
    rule = publish(fleet, keys, bad_sha(first))

    # A crash nobody has seen: its incident is new, and the rule fixes it at once.
    agent, lines = await pinned(fleet, second, keys, "dev-0002", clock)
    assert await asyncio.wait_for(agent.run(), 60) is Outcome.REMEDIATED, "\n".join(lines)
    assert not (second / "os" / CHANNEL_DIR / BAD).exists()
    assert all((second / "os" / CHANNEL_DIR / n).exists() for n in GOOD)
    [incident] = fleet.service.incidents(fleet.viewer)
    assert incident.title == "general protection fault in sensor_verify_channel"
    [rem] = fleet.service.remediations(fleet.viewer)
    assert rem.rule_id == rule.rule_id and rem.incident_id == incident.incident_id
    assert rem.status == "approved" and rem.approvals == [], "no new approval"
    assert [a.model_dump(mode="json") for a in rem.actions] == [
        {"type": "quarantine_file", "path": f"{CHANNEL_DIR}/{BAD}", "sha256": bad_sha(first)}
    ]
    applied = [e for e in fleet.service.events(fleet.viewer) if e.kind == "rule.applied"]
    assert [json.loads(e.detail)["incident"] for e in applied] == [incident.incident_id]
    [issued] = [e for e in fleet.service.events(fleet.viewer) if e.kind == "directive.issued"]
    assert json.loads(issued.detail)["rule"] == rule.rule_id
    assert fleet.service.rules(fleet.viewer)[0].uses == [rem.remediation_id]

    # Revoked: the fix it made is revoked too, and a third incident gets nothing from it.
    revoked = fleet.service.revoke_rule(fleet.user("alice"), rule.rule_id)
    assert revoked.status == "revoked" and revoked.revoked_by == "alice"
    assert fleet.service.remediations(fleet.viewer)[0].status == "revoked"
    agent, lines = await pinned(fleet, third, keys, "dev-0003", clock, time_to_reboot_min=10)
    run = asyncio.create_task(agent.run())
    await wait_for(lambda: len(fleet.service.incidents(fleet.viewer)) == 2)
    await clock.release()
    assert await asyncio.wait_for(run, 60) is Outcome.NO_REMEDIATION
    assert (third / "os" / CHANNEL_DIR / BAD).exists()
    assert len(fleet.service.remediations(fleet.viewer)) == 1
    assert kinds(fleet).count("rule.applied") == 1
    assert "rule.revoked" in kinds(fleet)
    assert fleet.service.verify_audit(fleet.viewer).ok


async def test_a_rule_approved_while_devices_wait_fixes_their_open_incident(fleet, keys, tmp_path, clock):
    m = machine_crashing_in(tmp_path, "waiting", "sensor_parse_channel")
    agent, lines = await pinned(fleet, m, keys, "dev-0001", clock)
    run = asyncio.create_task(agent.run())
    await wait_for(lambda: fleet.service.incidents(fleet.viewer))
    publish(fleet, keys, bad_sha(m))
    await clock.release()
    assert await asyncio.wait_for(run, 60) is Outcome.REMEDIATED, "\n".join(lines)
    assert not (m / "os" / CHANNEL_DIR / BAD).exists()


async def test_a_rule_with_a_rollout_plan_serves_through_its_waves(fleet, keys, tmp_path, clock):
    m = machine_crashing_in(tmp_path, "staged", "sensor_parse_channel")
    plan = {"waves": [{"name": "canary", "devices": ["dev-canary"]}, {"name": "all", "percent": 100}]}
    rule = publish(fleet, keys, bad_sha(m), rollout=plan)
    agent, _ = await pinned(fleet, m, keys, "dev-0001", clock, time_to_reboot_min=10)
    run = asyncio.create_task(agent.run())
    await wait_for(lambda: fleet.service.rollouts(fleet.viewer))
    [ro] = fleet.service.rollouts(fleet.viewer)
    [rem] = fleet.service.remediations(fleet.viewer)
    assert ro.remediation_id == rem.remediation_id and rem.rule_id == rule.rule_id
    assert [w.name for w in ro.plan.waves] == ["canary", "all"]
    await clock.release()
    # Not in the canary wave, and nobody promotes it: not served.
    assert await asyncio.wait_for(run, 60) is Outcome.NO_REMEDIATION
    assert (m / "os" / CHANNEL_DIR / BAD).exists()


def test_who_may_publish_and_approve_a_rule(fleet, keys):
    rule = fleet.service.create_rule(
        fleet.user("oscar"),
        {"title": "t", "path_pattern": PATTERN, "sha256": "a" * 64, "required_approvals": 2},
    )
    with pytest.raises(Forbidden):
        fleet.service.create_rule(fleet.viewer, {"title": "t", "path_pattern": PATTERN, "sha256": "a" * 64})
    with pytest.raises(BadRequest, match="absolute"):
        fleet.service.create_rule(
            fleet.user("oscar"), {"title": "t", "path_pattern": "/etc/*", "sha256": "a" * 64}
        )
    with pytest.raises(Forbidden, match="needs the approver role"):
        fleet.service.approve_rule(fleet.user("oscar"), rule.rule_id)
    own = fleet.service.create_rule(
        fleet.user("bob"), {"title": "t", "path_pattern": PATTERN, "sha256": "a" * 64}
    )
    with pytest.raises(Forbidden, match="bob wrote"):
        fleet.service.approve_rule(fleet.user("bob"), own.rule_id, signed(keys["bob"], own, "bob"))
    with pytest.raises(Forbidden, match="must be signed"):
        fleet.service.approve_rule(fleet.user("alice"), rule.rule_id)
    other = fleet.service.create_rule(
        fleet.user("oscar"), {"title": "t", "path_pattern": "var/*", "sha256": "a" * 64}
    )
    with pytest.raises(BadRequest, match="another rule"):
        fleet.service.approve_rule(fleet.user("alice"), rule.rule_id, signed(keys["alice"], other, "alice"))
    fleet.service.approve_rule(fleet.user("alice"), rule.rule_id, signed(keys["alice"], rule, "alice"))
    with pytest.raises(Conflict, match="already approved"):
        fleet.service.approve_rule(fleet.user("alice"), rule.rule_id, signed(keys["alice"], rule, "alice"))
    assert fleet.service.rules(fleet.viewer)[0].status == "pending", "one of two"
    assert [e.kind for e in fleet.service.events(fleet.viewer) if e.kind.startswith("rule.")] == [
        "rule.created",
        "rule.created",
        "rule.created",
        "rule.approval",
    ]


def _rule_directive(server: SigningKey, rule: KnownBadRule, actions, approvals) -> dict:
    now = utcnow()
    return seal(
        Directive(
            directive_id="dir-1",
            device_id="dev-1",
            agent_nonce="n" * 22,
            diagnostics_sha256="0" * 64,
            remediation_id="rem-1",
            issued_at=now,
            expires_at=now + timedelta(hours=1),
            actions=actions,
            approvals=approvals,
            rule=rule,
        ),
        server,
    )


RULE = KnownBadRule(rule_id="kbr-1", title="bad", path_pattern=PATTERN, sha256="c" * 64)


@pytest.mark.parametrize(
    "actions, rule, refused",
    [
        ([QuarantineFile(path=f"{CHANNEL_DIR}/{BAD}", sha256="c" * 64)], RULE, None),
        # A compromised server: another file, other content, or a wider rule than was signed.
        ([QuarantineFile(path=f"{CHANNEL_DIR}/{GOOD[0]}", sha256="d" * 64)], RULE, "do not follow"),
        ([QuarantineFile(path="etc/passwd", sha256="c" * 64)], RULE, "do not follow"),
        (
            [QuarantineFile(path="etc/passwd", sha256="c" * 64)],
            RULE.model_copy(update={"path_pattern": "*"}),
            "approver signature",
        ),
    ],
)
def test_the_device_checks_the_rules_signatures_and_that_the_actions_follow(actions, rule, refused):
    server, alice, bob = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    approvals = [
        seal(
            RuleApproval(
                rule_id=RULE.rule_id, rule_sha256=rule_digest(RULE), approver=n, approved_at=utcnow()
            ),
            k,
        )
        for n, k in (("alice", alice), ("bob", bob))
    ]
    check = lambda: open_directive(
        _rule_directive(server, rule, actions, approvals),
        {server.key_id: server.public},
        device_id="dev-1",
        agent_nonce="n" * 22,
        diagnostics_sha256="0" * 64,
        now=utcnow(),
        approver_keyring={key_id(k.public): k.public for k in (alice, bob)},
        approver_threshold=2,
    )
    if refused is None:
        assert check().message.rule == rule
    else:
        with pytest.raises(DirectiveRejected, match=refused):
            check()


async def test_admin_cli_publishes_a_rule_from_a_remediation_and_signs_it(fleet, tmp_path, clock):
    """recovery-admin rule create --from-remediation, rule approve --key, rule list, rule revoke,
    as two people at their command lines."""
    import sys

    m = machine_crashing_in(tmp_path, "cli", "sensor_parse_channel")
    settings = await enrolled_settings(fleet, m, "dev-0001", time_to_reboot_min=30)
    run = asyncio.create_task(RecoveryAgent(settings, clock=clock).run())
    await wait_for(lambda: fleet.service.incidents(fleet.viewer))
    incident = fleet.service.incidents(fleet.viewer)[0].incident_id
    tokens = {
        n: fleet.service.create_user(fleet.admin, n, r).token
        for n, r in (("olga", "operator"), ("dora", "approver"))
    }

    async def cli(who: str, *args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "recovery_server.admin_cli",
            "--server",
            fleet.url,
            "--token",
            tokens[who],
            "--json",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode, out.decode()

    code, out = await cli("olga", "remediation", "create", "--incident", incident, "--suggested")
    assert code == 0, out
    rem_id = json.loads(out)["remediation_id"]
    code, out = await cli(
        "olga", "rule", "create", "--title", "channel file 291 build 32", "--from-remediation", rem_id
    )
    assert code == 0, out
    rule = json.loads(out)
    assert rule["path_pattern"] == f"{CHANNEL_DIR}/{BAD}" and rule["sha256"] == bad_sha(m)
    code, out = await cli("dora", "key", str(tmp_path / "dora.key"))
    assert code == 0, out
    code, out = await cli("dora", "rule", "approve", rule["rule_id"], "--key", str(tmp_path / "dora.key"))
    assert code == 0, out
    assert out.startswith("signing approval of known-bad rule"), "it shows what it signs"
    assert json.loads(out[out.index("\n{") :])["status"] == "active"
    # The rule acted on the open incident (its remediation was not approved yet): the device is fixed.
    await clock.release()
    assert await asyncio.wait_for(run, 60) is Outcome.REMEDIATED
    code, out = await cli("dora", "rule", "list")
    [listed] = json.loads(out)
    assert listed["status"] == "active" and len(listed["uses"]) == 1 and listed["approvals"][0]["signed"]
    code, out = await cli("dora", "rule", "revoke", rule["rule_id"])
    assert code == 0 and json.loads(out)["status"] == "revoked"
    code, out = await cli("dora", "rule", "revoke", rule["rule_id"])
    assert code == 2 and "revoked already" in out
