"""Staged rollouts: waves, gates, automatic halt, pause/resume/revoke, and a 10,000-device
fleet going through canary, 10 % and 100 %."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from recovery_agent.protocol.admin import RolloutPlan
from recovery_agent.protocol.keys import SigningKey
from recovery_server.access import User, console
from recovery_server.errors import BadRequest, Conflict, Forbidden
from recovery_server.rollout import WaveCounts, decide, wave_of
from recovery_server.service import RecoveryService
from recovery_server.store import Store

from .fleetsim import BAD_PATH, BAD_SHA, FleetSim

ACTIONS = [{"type": "quarantine_file", "path": BAD_PATH, "sha256": BAD_SHA}]
SETUP = console("setup")
OSCAR = User("oscar", "operator")


# ---------------------------------------------------------------- the rules


def plan(**over) -> RolloutPlan:
    base = {
        "waves": [
            {"name": "canary", "devices": ["d1", "d2"]},
            {"name": "10%", "percent": 10},
            {"name": "100%", "percent": 100},
        ],
        "min_devices": 2,
        "min_success_rate": 0.9,
        "halt_failure_rate": 0.2,
        "halt_min_devices": 2,
    }
    base.update(over)
    return RolloutPlan.model_validate(base)


@pytest.mark.parametrize(
    "waves, message",
    [
        ([{"name": "a", "percent": 50}], "last wave must be percent 100"),
        (
            [{"name": "a", "percent": 50}, {"name": "b", "percent": 20}, {"name": "c", "percent": 100}],
            "percentages must grow",
        ),
        ([{"name": "a", "percent": 5, "devices": ["x"]}, {"name": "b", "percent": 100}], "either devices"),
    ],
)
def test_bad_plans_are_refused_with_the_reason(waves, message):
    with pytest.raises(ValueError, match=message):
        RolloutPlan.model_validate({"waves": waves})


def test_waves_are_deterministic_cumulative_and_sized():
    p = plan()
    assert wave_of(p, "ro-1", "d1") == 0 and wave_of(p, "ro-1", "d2") == 0
    waves = [wave_of(p, "ro-1", f"dev-{i}") for i in range(20000)]
    assert waves == [wave_of(p, "ro-1", f"dev-{i}") for i in range(20000)]
    share = waves.count(1) / len(waves)
    assert 0.09 < share < 0.11, share
    assert set(waves) == {1, 2}


def counts(served: int, succeeded: int = 0, failed: int = 0, not_counted: int = 0) -> WaveCounts:
    return WaveCounts(served=served + not_counted, counted=served, succeeded=succeeded, failed=failed)


def test_decide():
    p = plan()
    assert decide(p, 0, counts(2, succeeded=1), 0).action == "hold"
    assert decide(p, 0, counts(2, succeeded=2), 0).action == "promote"
    assert decide(p, 0, counts(3, succeeded=2, failed=1), 0).action == "halt"
    assert decide(plan(soak_s=60), 0, counts(2, succeeded=2), 10).action == "hold"
    assert decide(p, 2, counts(5, succeeded=5), 0).action == "complete"
    assert decide(p, 2, counts(6, succeeded=5), 0).action == "hold"  # one pending


def test_decide_reads_only_the_devices_that_count():
    """Devices served but not counted (enrolled after the rollout started, or served before)
    neither pass a gate, nor halt it, nor hold the last wave open."""
    p = plan()
    hold = decide(p, 0, counts(1, succeeded=1, not_counted=90), 0)
    assert hold.action == "hold" and hold.reason == "1 of 2 devices finished (90 more served, not counted)"
    assert decide(p, 0, counts(2, succeeded=2, not_counted=3), 0).action == "promote"
    assert decide(p, 2, counts(5, succeeded=5, not_counted=7), 0).action == "complete"


# ---------------------------------------------------------------- on the service, both stores


@pytest.fixture
def svc(store_url):
    s = RecoveryService(store=Store(store_url), server_key=SigningKey.generate())
    for name, role in (("admin", "admin"), ("alice", "approver"), ("bob", "approver"), ("oscar", "operator")):
        s.create_user(SETUP, name, role)
    yield s
    s.store.close()


def fleet_of(svc, n: int) -> FleetSim:
    sim = FleetSim(svc, n)
    sim.enroll_all(svc.create_enrollment_token(User("admin", "admin")).token)
    sim.crash_all()
    return sim


def remediation(svc) -> str:
    inc = svc.incidents(OSCAR)[0].incident_id
    return svc.create_remediation(OSCAR, title="q", actions=ACTIONS, incident_id=inc).remediation_id


def test_only_the_canary_is_served_until_its_gate_passes(svc):
    sim = fleet_of(svc, 40)
    rid = remediation(svc)
    canary = [d.device_id for d in sim.devices[:3]]
    ro = svc.create_rollout(
        User("oscar", "operator"),
        rid,
        {
            "waves": [{"name": "canary", "devices": canary}, {"name": "100%", "percent": 100}],
            "min_devices": 3,
            "soak_s": 3600,
        },
    )
    svc.approve(User("bob", "approver"), rid)
    assert sim.round(lambda w: 0.0) == 3
    assert sorted(d.device_id for d in sim.devices if d.done) == sorted(canary)
    status = svc.rollout(OSCAR, ro.rollout_id)
    assert status.current_wave == 0 and status.gate.startswith("soaking")
    assert sim.round(lambda w: 0.0) == 0, "soak time holds the next wave"
    an_hour_passes(svc)
    assert svc.rollout(OSCAR, ro.rollout_id).current_wave == 1
    assert sim.run(lambda w: 0.0) and all(d.done for d in sim.devices)
    assert svc.rollout(OSCAR, ro.rollout_id).state == "active", "the last wave soaks too"
    an_hour_passes(svc)
    assert svc.rollout(OSCAR, ro.rollout_id).state == "completed"


def an_hour_passes(svc) -> None:
    with svc.store.tx() as tx:
        tx.execute("UPDATE rollouts SET wave_started_at = '2000-01-01T00:00:00Z'")
    svc.tick()


def test_rollout_must_be_set_before_the_first_directive(svc):
    sim = fleet_of(svc, 3)
    rid = remediation(svc)
    svc.approve(User("bob", "approver"), rid)
    sim.round(lambda w: 0.0)
    with pytest.raises(Conflict, match="already being served"):
        svc.create_rollout(User("oscar", "operator"), rid, {"waves": [{"name": "all", "percent": 100}]})
    with pytest.raises(BadRequest, match="rollout plan"):
        svc.create_rollout(User("oscar", "operator"), rid, {"waves": []})


def test_pause_resume_revoke(svc):
    sim = fleet_of(svc, 30)
    rid = remediation(svc)
    ro = svc.create_rollout(User("oscar", "operator"), rid, {"waves": [{"name": "all", "percent": 100}]})
    rollout_id = ro.rollout_id
    with pytest.raises(Forbidden):
        svc.set_rollout_state(User("victor", "viewer"), rollout_id, "pause")
    svc.set_rollout_state(User("oscar", "operator"), rollout_id, "pause")
    svc.approve(User("bob", "approver"), rid)
    assert sim.round(lambda w: 0.0) == 0, "paused: nobody is served"
    with pytest.raises(Forbidden, match="approver"):
        svc.set_rollout_state(User("oscar", "operator"), rollout_id, "resume")
    svc.set_rollout_state(User("alice", "approver"), rollout_id, "resume")
    first = sim.devices[0]
    answer = svc.poll(first.report.report_id, first.report.poll_token)
    assert answer.status == "directive"
    svc.set_rollout_state(User("alice", "approver"), rollout_id, "revoke")
    second = sim.devices[1]
    assert svc.poll(second.report.report_id, second.report.poll_token).status == "none"
    assert svc.remediation(OSCAR, rid).status == "revoked"
    kinds = [e.kind for e in svc.events(OSCAR)]
    assert {"rollout.pause", "rollout.resume", "rollout.revoke"} <= set(kinds)


def test_a_device_that_crashes_again_counts_as_a_failure(svc):
    sim = fleet_of(svc, 2)
    rid = remediation(svc)
    ro = svc.create_rollout(
        User("oscar", "operator"),
        rid,
        {"waves": [{"name": "all", "percent": 100}], "min_devices": 5, "halt_min_devices": 1},
    )
    svc.approve(User("bob", "approver"), rid)
    dev = sim.devices[0]
    assert svc.poll(dev.report.report_id, dev.report.poll_token).status == "directive"
    sim._report(dev)  # applied, rebooted, crashed again: back in recovery
    status = svc.rollout(OSCAR, ro.rollout_id)
    assert status.waves[0].failed == 1
    assert status.state == "halted" and "1 of 1 devices failed" in status.reason


def test_outcomes_written_together_judge_their_rollout_once_and_a_later_serve_sees_its_gate(svc, monkeypatch):
    from recovery_agent.protocol.wire import Health, utcnow
    from recovery_server import rollout

    sim = fleet_of(svc, 30)
    rid = remediation(svc)
    canary = sim.devices[:4]
    ro = svc.create_rollout(
        OSCAR,
        rid,
        {
            "waves": [
                {"name": "canary", "devices": [d.device_id for d in canary]},
                {"name": "all", "percent": 100},
            ],
            "min_devices": 4,
            "soak_s": 0,
        },
    )
    svc.approve(User("bob", "approver"), rid)
    directives = {dev.device_id: sim.poll_once(dev) for dev in canary}
    other = sim.devices[10].device_id
    counted = []
    real = rollout._wave_counts
    monkeypatch.setattr(rollout, "_wave_counts", lambda db, r, w: counted.append(w) or real(db, r, w))
    with svc.store.tx() as tx:
        # Four healthy boots in one transaction (one group-commit batch): no wave count yet.
        for dev in canary:
            health = Health(
                device_id=dev.device_id,
                directive_id=directives[dev.device_id],
                boot_id="b",
                created_at=utcnow(),
            )
            svc._directives.write_health(tx, health)
        assert counted == []
        # A serve later in the same transaction judges first, once, and sees the open wave.
        assert svc._rollouts.serving(tx, rid, other) == ("issue", 1)
        assert counted == [0]
        svc._rollouts.serving(tx, rid, other)
    assert counted == [0], "judged once for the four outcomes"
    assert svc.rollout(OSCAR, ro.rollout_id).current_wave == 1
    kinds = [e.kind for e in svc.events(OSCAR)]
    assert kinds.count("rollout.promoted") == 1
    assert kinds.index("rollout.promoted") > max(i for i, k in enumerate(kinds) if k == "directive.succeeded")
    assert svc.verify_audit(OSCAR).ok


# ---------------------------------------------------------------- 10,000 devices


def fast_store_url() -> str:
    """The simulation measures the rules, not the disk: keep its SQLite file in RAM when the
    machine has /dev/shm (fsync is then free), else in a temp dir."""
    base = Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())
    return str(Path(tempfile.mkdtemp(prefix="qmr-fleet-", dir=base)) / "fleet.db")


@pytest.fixture(scope="module")
def big_fleet_factory():
    made = []

    def make():
        svc = RecoveryService(store=Store(fast_store_url()), server_key=SigningKey.generate())
        for name, role in (("admin", "admin"), ("bob", "approver"), ("oscar", "operator")):
            svc.create_user(SETUP, name, role)
        made.append(svc)
        return svc, fleet_of(svc, 10_000)

    yield make
    for svc in made:
        svc.store.close()


def staged(svc, sim) -> str:
    rid = remediation(svc)
    ro = svc.create_rollout(
        User("oscar", "operator"),
        rid,
        {
            "waves": [
                {"name": "canary", "devices": [d.device_id for d in sim.devices[:50]]},
                {"name": "10%", "percent": 10},
                {"name": "100%", "percent": 100},
            ],
            "min_devices": 40,
            "min_success_rate": 0.9,
            "halt_failure_rate": 0.2,
            "halt_min_devices": 40,
        },
    )
    svc.approve(User("bob", "approver"), rid)
    return ro.rollout_id


@pytest.mark.timeout(600)
def test_ten_thousand_devices_go_through_canary_ten_percent_and_everyone(big_fleet_factory):
    svc, sim = big_fleet_factory()
    rollout_id = staged(svc, sim)
    sim.run(lambda wave: 0.02)
    status = svc.rollout(OSCAR, rollout_id)
    assert status.state == "completed", status.reason
    served = [w.served for w in status.waves]
    assert sum(served) == 10_000 and served[0] == 50
    assert 800 < served[1] < 1200
    promoted = [e for e in svc.events(OSCAR) if e.kind == "rollout.promoted"]
    assert len(promoted) == 2


@pytest.mark.timeout(600)
def test_rollout_halts_itself_at_the_wave_where_failures_cross_the_threshold(big_fleet_factory):
    """The canary is fine; in the 10 % wave 40 % of devices fail (say, hardware the canary did
    not have). The rollout must stop there: no device of the last wave gets the directive."""
    svc, sim = big_fleet_factory()
    rollout_id = staged(svc, sim)
    sim.run(lambda wave: 0.0 if wave == 0 else 0.4)
    status = svc.rollout(OSCAR, rollout_id)
    assert status.state == "halted"
    assert status.current_wave == 1 and "'10%'" in status.reason
    assert status.waves[2].served == 0
    directive_waves = {r[0] for r in svc.store.all("SELECT DISTINCT wave FROM directives")}
    assert directive_waves <= {0, 1}
    unserved = [d for d in sim.devices if not d.done]
    p = status.plan
    unserved_waves = [wave_of(p, rollout_id, d.device_id) for d in unserved]
    assert set(unserved_waves) <= {1, 2}, "the halt also stops the rest of its own wave"
    assert unserved_waves.count(2) == sum(1 for d in sim.devices if wave_of(p, rollout_id, d.device_id) == 2)
    # Halted means waiting for a person, not "no fix": those devices keep polling.
    d = unserved[0]
    assert svc.poll(d.report.report_id, d.report.poll_token).status == "pending"
