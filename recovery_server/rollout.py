"""Staged rollout of an approved remediation: waves, gates, and the automatic halt.

The lesson of July 2024 is that nothing should reach every machine at once. A rollout splits
the devices an incident affects into waves: named canary devices first, then growing
percentages (10 %, then 100 %, say). A directive is served only to a device whose wave has
been reached. Before the next wave opens, a gate must pass: enough devices of the current
wave finished (``min_devices``), enough of them succeeded (``min_success_rate``), and the wave
has soaked for ``soak_s`` seconds. When the failure rate of the current wave passes
``halt_failure_rate`` (once ``halt_min_devices`` finished), the rollout halts by itself;
people can pause, resume or revoke it at any time.

Success means the device later reported a healthy boot after applying the directive. Failure
means the agent could not apply it, or the device crashed again (new diagnostics), or it ran
out of recovery attempts. Everything else is pending.

Who counts. Every device whose wave is open is served, but only some devices' outcomes move
the gates (``counts``, decided once when the directive is made and kept with it):

- the device's key was enrolled before the rollout started: the audit log's sequence number of
  its enrollment is below the rollout's (``devices.py``). A holder of the enrollment token can
  add devices at any time; those it adds once the rollout is under way, fakes or real new
  machines, are served the fix but do not steer it (the rollout view shows them as served,
  not counted);
- it was seen failing before its directive: every directive answers the device's own signed
  report of the incident's crash (``directives.py``);
- once: only its first directive of the rollout counts, however many reports, results or
  healthy boots it sends;
- it is still trusted: revoking a device, or replacing its key, takes its directives out of
  every count (``devices.py``).

Wave membership is a pure function of the rollout id and the device id (a sha256 bucket from
0 to 9999), so every server process computes the same waves and a device never moves
between waves. A percentage wave holds the devices whose bucket falls below it, so waves are
cumulative: 10 % then 100 % means the 100 % wave adds the other 90 %.

The plan (``RolloutPlan``, its ``Wave``s) is part of the admin API (``protocol/admin.py``).
The rules are pure functions (``wave_of``, ``decide``); ``Rollouts`` applies them to the
store, each change in one transaction: ``serving`` tells ``directives.py`` whether a device's
wave is open, ``judge`` re-judges a rollout after each outcome, ``tick`` as time passes.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import ValidationError

from recovery_agent.protocol.admin import Rollout, RolloutPlan, WaveProgress
from recovery_agent.protocol.errors import describe_validation

from . import audit
from .access import Operation, User, require
from .errors import BadRequest, Conflict, NotFound
from .store import Reader, Row, Store, Tx, iso, new_id, parse_iso

BUCKETS = 10_000


def bucket(rollout_id: str, device_id: str) -> int:
    digest = hashlib.sha256(f"{rollout_id}\n{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


@functools.lru_cache(maxsize=256)
def _plan(text: str) -> RolloutPlan:
    """A rollout's stored plan, parsed once per text (frozen; a plan never changes)."""
    return RolloutPlan.model_validate_json(text)


def wave_of(plan: RolloutPlan, rollout_id: str, device_id: str) -> int:
    """The first wave that holds the device (the last wave holds everyone)."""
    b = bucket(rollout_id, device_id)
    for i, w in enumerate(plan.waves):
        if device_id in w.devices or (w.percent is not None and b < w.percent * BUCKETS / 100):
            return i
    return len(plan.waves) - 1


@dataclass(frozen=True)
class WaveCounts:
    """A wave's directives: ``served`` all of them; ``counted`` those whose outcome moves the
    gate, and ``succeeded`` and ``failed`` among those."""

    served: int = 0
    counted: int = 0
    succeeded: int = 0
    failed: int = 0

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed

    @property
    def pending(self) -> int:
        return self.counted - self.finished

    @property
    def not_counted(self) -> int:
        return self.served - self.counted


@dataclass(frozen=True)
class Decision:
    action: Literal["hold", "promote", "complete", "halt"]
    reason: str


def decide(plan: RolloutPlan, current_wave: int, counts: WaveCounts, soaked_s: float) -> Decision:
    """What an active rollout should do now, from the current wave's counts."""
    if counts.finished >= plan.halt_min_devices and counts.finished:
        failure_rate = counts.failed / counts.finished
        if failure_rate > plan.halt_failure_rate:
            return Decision(
                "halt",
                f"wave {plan.waves[current_wave].name!r}: {counts.failed} of "
                f"{counts.finished} devices failed ({failure_rate:.0%} > "
                f"{plan.halt_failure_rate:.0%})",
            )
    if counts.finished < plan.min_devices:
        also = f" ({counts.not_counted} more served, not counted)" if counts.not_counted else ""
        return Decision("hold", f"{counts.finished} of {plan.min_devices} devices finished{also}")
    success_rate = counts.succeeded / counts.finished
    if success_rate < plan.min_success_rate:
        return Decision("hold", f"success {success_rate:.0%} < {plan.min_success_rate:.0%}")
    if soaked_s < plan.soak_s:
        return Decision("hold", f"soaking: {soaked_s:.0f} of {plan.soak_s:.0f} s")
    if current_wave + 1 >= len(plan.waves):
        if counts.pending == 0:
            return Decision("complete", "the last wave passed its gate")
        return Decision("hold", f"last wave: {counts.pending} devices pending")
    return Decision(
        "promote", f"gate passed: {counts.succeeded}/{counts.finished} succeeded, soaked {soaked_s:.0f} s"
    )


# ---------------------------------------------------------------- on the store

_STATE_CHANGES = {
    "pause": Operation.PAUSE_ROLLOUT,
    "resume": Operation.RESUME_ROLLOUT,
    "revoke": Operation.REVOKE_ROLLOUT,
}


def start_rollout(tx: Tx, now: str, actor: str, remediation_id: str, plan: RolloutPlan) -> str:
    """Set ``plan`` for a remediation that has none and has served nothing yet, inside
    ``tx``; the rollout's id. Devices enrolled before its audit entry count in it."""
    rollout_id = new_id("ro")
    started_seq = audit.record(
        tx,
        now,
        "rollout.created",
        actor,
        subject=rollout_id,
        detail={"remediation": remediation_id, "waves": [w.name for w in plan.waves]},
    )
    tx.execute(
        "INSERT INTO rollouts(rollout_id, remediation_id, plan, state, current_wave, "
        "wave_started_at, created_by, created_at, started_seq) VALUES (?,?,?,'active',0,?,?,?,?)",
        rollout_id,
        remediation_id,
        plan.model_dump_json(),
        now,
        actor,
        now,
        started_seq,
    )
    return rollout_id


class Rollouts:
    def __init__(self, store: Store, now: Callable[[], datetime], changed: Callable[[], None]) -> None:
        self._store = store
        self._now = now
        self._changed = changed

    def create(self, user: User, remediation_id: str, plan: RolloutPlan | Mapping[str, Any]) -> Rollout:
        require(user, Operation.SET_ROLLOUT)
        try:
            parsed = plan if isinstance(plan, RolloutPlan) else RolloutPlan.model_validate(plan)
        except ValidationError as exc:
            raise BadRequest(f"rollout plan: {describe_validation(exc)}") from None
        now = iso(self._now())
        with self._store.tx() as tx:
            rem = tx.one("SELECT * FROM remediations WHERE remediation_id = ?", remediation_id)
            if rem is None:
                raise NotFound(f"no remediation {remediation_id}")
            if rem["status"] == "revoked":
                raise Conflict(f"{remediation_id} was revoked")
            if tx.one("SELECT 1 FROM directives WHERE remediation_id = ?", remediation_id):
                raise Conflict(
                    f"{remediation_id} is already being served: a rollout must be set "
                    "before the first directive"
                )
            if tx.one("SELECT 1 FROM rollouts WHERE remediation_id = ?", remediation_id):
                raise Conflict(f"{remediation_id} has a rollout already")
            rollout_id = start_rollout(tx, now, user.name, remediation_id, parsed)
        return self._view(rollout_id)

    def set_state(self, user: User, rollout_id: str, action: str) -> Rollout:
        """``action`` is pause, resume or revoke (access.py says who may)."""
        if action not in _STATE_CHANGES:
            raise BadRequest(f"unknown rollout action {action!r}: pause, resume or revoke")
        require(user, _STATE_CHANGES[action])
        now = iso(self._now())
        with self._store.tx() as tx:
            ro = tx.one("SELECT * FROM rollouts WHERE rollout_id = ?", rollout_id)
            if ro is None:
                raise NotFound(f"no rollout {rollout_id}")
            state = ro["state"]
            if state in ("revoked", "completed"):
                raise Conflict(f"rollout {rollout_id} is {state}")
            if action == "pause":
                if state != "active":
                    raise Conflict(f"rollout {rollout_id} is {state}, not active")
                tx.execute(
                    "UPDATE rollouts SET state = 'paused', reason = ? WHERE rollout_id = ?",
                    f"paused by {user.name}",
                    rollout_id,
                )
            elif action == "resume":
                if state not in ("paused", "halted"):
                    raise Conflict(f"rollout {rollout_id} is {state}, not paused or halted")
                # Resuming a halted wave is a person overriding the automatic halt for it.
                tx.execute(
                    "UPDATE rollouts SET state = 'active', reason = ?, halt_overridden = ? "
                    "WHERE rollout_id = ?",
                    f"resumed by {user.name}",
                    1 if state == "halted" else ro["halt_overridden"],
                    rollout_id,
                )
            elif action == "revoke":
                tx.execute(
                    "UPDATE rollouts SET state = 'revoked', reason = ? WHERE rollout_id = ?",
                    f"revoked by {user.name}",
                    rollout_id,
                )
                tx.execute(
                    "UPDATE remediations SET status = 'revoked' WHERE remediation_id = ?",
                    ro["remediation_id"],
                )
            audit.record(
                tx,
                now,
                f"rollout.{action}",
                user.name,
                subject=rollout_id,
                detail={"from": state, "wave": ro["current_wave"]},
            )
        self._changed()
        return self._view(rollout_id)

    def serving(
        self, db: Reader, remediation_id: str, device_id: str
    ) -> tuple[Literal["issue", "pending", "none"], int | None]:
        """May the approved ``remediation_id`` be served to ``device_id`` now ('issue'), later
        ('pending': its wave is not open, or the rollout is paused or halted) or never
        ('none': revoked); and the device's wave, if the remediation has a rollout."""
        if isinstance(db, Tx):  # outcomes earlier in this transaction may move its gate
            db.settle_now(_judging(remediation_id))
        ro = db.one("SELECT * FROM rollouts WHERE remediation_id = ?", remediation_id)
        if ro is None:
            return "issue", None
        wave = wave_of(_plan(ro["plan"]), ro["rollout_id"], device_id)
        if ro["state"] == "completed":
            return "issue", wave
        if ro["state"] == "revoked":
            return "none", wave
        if ro["state"] != "active":
            return "pending", wave  # paused or halted: wait; a person may resume it
        return ("issue" if wave <= ro["current_wave"] else "pending"), wave

    def wave(self, db: Reader, remediation_id: str, device_id: str) -> int | None:
        """The device's wave in the rollout of ``remediation_id``, or None if it has none."""
        ro = db.one("SELECT rollout_id, plan FROM rollouts WHERE remediation_id = ?", remediation_id)
        return None if ro is None else wave_of(_plan(ro["plan"]), ro["rollout_id"], device_id)

    def counts(self, db: Reader, remediation_id: str, device_id: str) -> bool:
        """Will the outcome of a directive of ``remediation_id`` made now for ``device_id`` move
        its rollout's gates? Only for a trusted device enrolled before the rollout started, and
        only for its first directive of the rollout (see "Who counts" above)."""
        ro = db.one("SELECT started_seq FROM rollouts WHERE remediation_id = ?", remediation_id)
        if ro is None:
            return False  # no rollout, no gate
        dev = db.one("SELECT enrolled_seq, revoked_at FROM devices WHERE device_id = ?", device_id)
        if dev is None or dev["revoked_at"] or dev["enrolled_seq"] >= ro["started_seq"]:
            return False
        # By device only: a device has few directives, and this reads them through its own
        # index where a query naming the remediation too may walk the whole rollout's.
        served = db.all("SELECT remediation_id, counted FROM directives WHERE device_id = ?", device_id)
        return not any(r["remediation_id"] == remediation_id and r["counted"] for r in served)

    def judge(self, tx: Tx, remediation_id: str) -> None:
        """Re-judge the rollout of ``remediation_id``, if it has one, after a device's outcome:
        once per transaction, before it commits or before a directive of that remediation is
        served in it (:meth:`serving`), whichever comes first. A batch of outcomes
        (groupcommit.py) is judged once, not once per outcome: judging counts the wave, and
        at 100,000 devices a wave holds tens of thousands."""
        tx.settle[_judging(remediation_id)] = lambda t: self._judge_now(t, remediation_id)

    def _judge_now(self, tx: Tx, remediation_id: str) -> None:
        ro = tx.one("SELECT * FROM rollouts WHERE remediation_id = ?", remediation_id)
        if ro is not None:
            self._evaluate(tx, ro)

    def tick(self) -> None:
        """Re-judge every active rollout (soak time passes without any device event)."""
        for row in self._store.all("SELECT rollout_id FROM rollouts WHERE state = 'active'"):
            with self._store.tx() as tx:
                ro = tx.one("SELECT * FROM rollouts WHERE rollout_id = ?", row["rollout_id"])
                if ro is not None:
                    self._evaluate(tx, ro)

    def _evaluate(self, tx: Tx, ro: Row) -> None:
        if ro["state"] != "active":
            return
        status = tx.scalar("SELECT status FROM remediations WHERE remediation_id = ?", ro["remediation_id"])
        if status != "approved":
            return
        plan = _plan(ro["plan"])
        counts = _wave_counts(tx, ro["remediation_id"], ro["current_wave"])
        soaked = (self._now() - parse_iso(ro["wave_started_at"])).total_seconds()
        decision = decide(plan, ro["current_wave"], counts, soaked)
        if decision.action == "halt" and ro["halt_overridden"]:
            return
        now = iso(self._now())
        if decision.action == "promote":
            tx.execute(
                "UPDATE rollouts SET current_wave = current_wave + 1, wave_started_at = ?, "
                "halt_overridden = 0, reason = ? WHERE rollout_id = ?",
                now,
                decision.reason,
                ro["rollout_id"],
            )
            audit.record(
                tx,
                now,
                "rollout.promoted",
                "server",
                subject=ro["rollout_id"],
                detail={"to_wave": plan.waves[ro["current_wave"] + 1].name, "why": decision.reason},
            )
            self._changed()
        elif decision.action in ("halt", "complete"):
            state = "halted" if decision.action == "halt" else "completed"
            tx.execute(
                "UPDATE rollouts SET state = ?, reason = ? WHERE rollout_id = ?",
                state,
                decision.reason,
                ro["rollout_id"],
            )
            audit.record(
                tx,
                now,
                f"rollout.{state}",
                "server",
                subject=ro["rollout_id"],
                detail={"wave": plan.waves[ro["current_wave"]].name, "why": decision.reason},
            )

    # ---------------------------------------------------------------- views

    def rollout(self, user: User, rollout_id: str) -> Rollout:
        require(user, Operation.READ_FLEET)
        return self._view(rollout_id)

    def rollouts(self, user: User) -> list[Rollout]:
        require(user, Operation.READ_FLEET)
        return [
            self._view(r["rollout_id"])
            for r in self._store.all("SELECT rollout_id FROM rollouts ORDER BY created_at")
        ]

    def _view(self, rollout_id: str) -> Rollout:
        ro = self._store.one("SELECT * FROM rollouts WHERE rollout_id = ?", rollout_id)
        if ro is None:
            raise NotFound(f"no rollout {rollout_id}")
        plan = _plan(ro["plan"])
        gate = ""
        if ro["state"] == "active":
            counts = _wave_counts(self._store, ro["remediation_id"], ro["current_wave"])
            soaked = (self._now() - parse_iso(ro["wave_started_at"])).total_seconds()
            gate = decide(plan, ro["current_wave"], counts, soaked).reason
        waves = []
        for i, w in enumerate(plan.waves):
            c = _wave_counts(self._store, ro["remediation_id"], i)
            waves.append(
                WaveProgress(
                    name=w.name,
                    reached=i <= ro["current_wave"],
                    served=c.served,
                    counted=c.counted,
                    succeeded=c.succeeded,
                    failed=c.failed,
                    pending=c.pending,
                )
            )
        return Rollout.model_validate({**dict(ro), "plan": plan, "gate": gate, "waves": waves})


def _judging(remediation_id: str) -> str:
    return f"rollout.judge:{remediation_id}"


def stop_counting(tx: Tx, device_id: str) -> None:
    """The device was revoked or its key replaced: none of its directives moves a gate again
    (the next rollout counts it again if its new key was enrolled before that rollout started)."""
    tx.execute("UPDATE directives SET counted = 0 WHERE device_id = ?", device_id)


def _wave_counts(db: Reader, remediation_id: str, wave: int) -> WaveCounts:
    got = {
        (bool(r[0]), r[1]): r[2]
        for r in db.all(
            "SELECT counted, outcome, count(*) FROM directives WHERE remediation_id = ? AND wave = ? "
            "GROUP BY counted, outcome",
            remediation_id,
            wave,
        )
    }
    return WaveCounts(
        served=sum(got.values()),
        counted=sum(n for (counted, _), n in got.items() if counted),
        succeeded=got.get((True, "succeeded"), 0),
        failed=got.get((True, "failed"), 0),
    )
