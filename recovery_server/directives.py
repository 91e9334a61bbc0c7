"""Directives: the signed answer to one report, and what became of it.

1. The device polls with the report's poll token (``poll``; the HTTP layer makes it a long
   poll). A directive is due when the report's incident has an approved remediation
   (``remediations.py``), the files that remediation names are on this device with the content
   it reported, and the device's rollout wave has been reached (``rollout.py``).
2. The directive is made once per report, inside one write transaction, so two pollers or two
   server processes serve the same one. It is signed by the server key, bound to the device,
   the agent's nonce, the hash of the diagnostics and an expiry, and carries the approvers'
   own signatures.
3. Its outcome is recorded once: failed when the agent reports it could not apply it or the
   device reports a crash again; succeeded when the OS reports a healthy boot after it. Each
   outcome lets the rollout re-judge its current wave. Whether an outcome counts there at all
   (the device enrolled before the rollout started, its first directive of the rollout) is
   decided when the directive is made (``Rollouts.counts``) and kept with it.
4. A revoked device is served nothing more: its polls are refused like its messages.
"""

from __future__ import annotations

import functools
import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, TypeAdapter

from recovery_agent.protocol import envelope
from recovery_agent.protocol.keys import SigningKey
from recovery_agent.protocol.wire import (
    Action,
    Directive,
    DirectivePoll,
    Health,
    QuarantineFile,
    Result,
)

from . import audit
from .access import Operation, User, require
from .devices import Devices
from .errors import NotFound
from .fleetfiles import apply_update, listed_files
from .recoverytests import RecoveryTests, is_test
from .remediations import approved_remediation
from .rollout import Rollouts
from .rules import known_bad_rule, rule_approvals
from .store import Reader, Row, Store, Tx, iso, new_id, token_sha256

_ACTIONS = TypeAdapter(list[Action])


@functools.lru_cache(maxsize=256)
def _actions(text: str) -> tuple[Action, ...]:
    """A remediation's stored actions, parsed once per text (a remediation's never change; the
    polls an approval wakes all read the same)."""
    return tuple(_ACTIONS.validate_json(text))


@dataclass
class Due:
    """A report whose directive ``look`` found due; ``issue`` it inside a write transaction.
    What it lists is read once for both."""

    report: Row
    _inventory: tuple[frozenset[tuple[str, str]], frozenset[str]] | None = None

    def inventory(self) -> tuple[frozenset[tuple[str, str]], frozenset[str]]:
        """The (path, sha256) of every driver and channel file the report lists, and their
        folders (a woken poll's full model parse cost more than the rest of its look)."""
        if self._inventory is None:
            records = listed_files(self.report["payload"], ("channel_files", "drivers"))
            self._inventory = (
                frozenset((f["path"], f["sha256"]) for f in records),
                frozenset(f["path"].rpartition("/")[0] for f in records),
            )
        return self._inventory


class DeviceResult(BaseModel):
    """What a device's agent reported for one directive (not on the admin API: the lab reads it
    in process)."""

    model_config = ConfigDict(allow_inf_nan=False)

    directive_id: str
    outcome: Literal["applied", "failed", "rejected"]
    received_at: AwareDatetime


class Directives:
    def __init__(
        self,
        store: Store,
        now: Callable[[], datetime],
        server_key: SigningKey,
        ttl: timedelta,
        devices: Devices,
        rollouts: Rollouts,
        tests: RecoveryTests,
    ) -> None:
        self._store = store
        self._now = now
        self._server_key = server_key
        self._ttl = ttl
        self._devices = devices
        self._rollouts = rollouts
        self._tests = tests

    def poll(self, report_id: str, poll_token: str) -> DirectivePoll:
        """One look for a directive for this report; the HTTP layer repeats it (long poll)."""
        looked = self.look(report_id, poll_token)
        if isinstance(looked, DirectivePoll):
            return looked
        with self._store.tx() as tx:
            return self.issue(tx, looked)

    def look(self, report_id: str, poll_token: str) -> DirectivePoll | Due:
        """The read-only part of a poll: its answer, or, when a directive is due, the report's
        row, to ``issue`` inside a write transaction."""
        if is_test(report_id):
            return self._tests.poll(report_id, poll_token)
        report = self._store.one("SELECT * FROM reports WHERE report_id = ?", report_id)
        if report is None or not secrets.compare_digest(
            report["poll_token_sha256"], token_sha256(poll_token)
        ):
            raise NotFound("no such report, or wrong poll token")
        self._devices.refuse_revoked(self._store, report["device_id"])
        existing = self._store.one("SELECT envelope FROM directives WHERE report_id = ?", report_id)
        if existing:
            return DirectivePoll(status="directive", envelope=json.loads(existing["envelope"]))
        due = Due(report)
        verdict, _, _ = self._due(self._store, due)
        if verdict != "issue":
            return DirectivePoll(status=verdict, retry_after_s=1)
        return due

    def waiting_on(self, report_id: str) -> tuple[str, int | None]:
        """What a pending poll of ``report_id`` waits on: its incident, and the device's wave
        in the rollout of the incident's approved fix, if there is one (until that wave opens,
        a promotion to another wave changes nothing for this report)."""
        report = self._store.one("SELECT device_id, incident_id FROM reports WHERE report_id = ?", report_id)
        if report is None:
            raise NotFound("no such report, or wrong poll token")
        rem = approved_remediation(self._store, report["incident_id"])
        if rem is None:
            return str(report["incident_id"]), None
        return str(report["incident_id"]), self._rollouts.wave(
            self._store, rem["remediation_id"], report["device_id"]
        )

    def issue(self, tx: Tx, due: Due) -> DirectivePoll:
        """Issue the directive ``look`` found due, inside ``tx``: the remediation and its
        rollout are read again here, so two server processes (or two polls of one batch:
        groupcommit.py) agree on who is served and no wave takes more than its share."""
        again = tx.one("SELECT envelope FROM directives WHERE report_id = ?", due.report["report_id"])
        if again:  # another poller or process won the race; serve theirs
            return DirectivePoll(status="directive", envelope=json.loads(again["envelope"]))
        verdict, rem, wave = self._due(tx, due)
        if verdict != "issue":
            return DirectivePoll(status=verdict, retry_after_s=1)
        assert rem is not None, "an issue verdict names its remediation"
        return self._issue(tx, due.report, rem, wave)

    def _due(
        self, db: Reader, due: Due
    ) -> tuple[Literal["issue", "pending", "none"], Row | None, int | None]:
        """Issue now, ask again later ('pending'), or no fix for this report ('none'); and the
        approved remediation and the device's wave in its rollout, if any."""
        report = due.report
        rem = approved_remediation(db, report["incident_id"])
        if rem is None:
            revoked = db.one(
                "SELECT 1 FROM remediations WHERE incident_id = ? AND status = 'revoked'",
                report["incident_id"],
            )
            pending = db.one(
                "SELECT 1 FROM remediations WHERE incident_id = ? AND status = 'pending'",
                report["incident_id"],
            )
            return ("none" if revoked and not pending else "pending"), None, None
        if _not_on_device(_actions(rem["actions"]), due):
            return "none", rem, None
        verdict, wave = self._rollouts.serving(db, rem["remediation_id"], report["device_id"])
        return verdict, rem, wave

    def _issue(self, tx: Tx, report: Row, rem: Row, wave: int | None) -> DirectivePoll:
        counted = self._rollouts.counts(tx, rem["remediation_id"], report["device_id"])
        now = self._now()
        rule = None
        if rem["rule_id"]:  # made from a known-bad rule: its approvals are the rule's
            rule_row = tx.one("SELECT * FROM known_bad_rules WHERE rule_id = ?", rem["rule_id"])
            assert rule_row is not None, "a remediation's rule is never deleted"
            rule = known_bad_rule(rule_row)
            approvals = rule_approvals(tx, rule.rule_id)
        else:
            approvals = self._approvals(tx, rem["remediation_id"])
        directive = Directive(
            directive_id=new_id("dir"),
            device_id=report["device_id"],
            agent_nonce=report["agent_nonce"],
            diagnostics_sha256=report["diagnostics_sha256"],
            remediation_id=rem["remediation_id"],
            remediation_title=rem["title"],
            issued_at=now,
            expires_at=now + self._ttl,
            actions=list(_actions(rem["actions"])),
            approvals=approvals,
            rule=rule,
        )
        env = envelope.seal(directive, self._server_key)
        tx.execute(
            "INSERT INTO directives(directive_id, device_id, report_id, remediation_id, issued_at, "
            "expires_at, envelope, wave, counted) VALUES (?,?,?,?,?,?,?,?,?)",
            directive.directive_id,
            directive.device_id,
            report["report_id"],
            rem["remediation_id"],
            iso(now),
            iso(directive.expires_at),
            json.dumps(env),
            wave,
            1 if counted else 0,
        )
        audit.record(
            tx,
            iso(now),
            "directive.issued",
            "server",
            directive.device_id,
            directive.directive_id,
            {
                "remediation": rem["remediation_id"],
                "report": report["report_id"],
                "wave": wave,
                "counted": counted,
                **({"rule": rule.rule_id} if rule else {}),
            },
        )
        return DirectivePoll(status="directive", envelope=env)

    @staticmethod
    def _approvals(tx: Tx, remediation_id: str) -> list[Any]:
        """The approvers' signed approvals a directive carries: read once per transaction (a
        batch of polls woken by one approval all carry the same)."""
        key = f"approvals:{remediation_id}"
        if key not in tx.cache:
            tx.cache[key] = [
                json.loads(r["envelope"])
                for r in tx.all(
                    "SELECT envelope FROM approvals WHERE remediation_id = ? AND envelope IS NOT NULL "
                    "ORDER BY approved_at, approver",
                    remediation_id,
                )
            ]
        return list(tx.cache[key])

    # ---------------------------------------------------------------- outcomes

    def accept_result(self, raw: bytes) -> dict[str, Any]:
        """Check, store and acknowledge an agent's result, in a transaction of its own."""
        r = self.check_result(raw)
        with self._store.tx() as tx:
            answer = self.write_result(tx, r)
        self.written(r.device_id, "Result", answer)
        return answer

    def written(self, device_id: str, kind: str, answer: dict[str, Any]) -> None:
        """After a result or health report committed: spend the device's budget, unless it was
        a duplicate that changed nothing (a duplicate health report whose inventory was stored
        costs as much as a new one: else a device could rewrite its inventory for free)."""
        if answer["status"] == "recorded" or answer.get("inventory") == "stored":
            self._devices.limits.spend(device_id, kind)

    def check_result(self, raw: bytes) -> Result:
        """A result's envelope, signature, signer and budget: everything that needs no write."""
        return self._devices.open_message(raw, Result).message

    def write_result(self, tx: Tx, r: Result) -> dict[str, Any]:
        """Store a checked result inside ``tx`` (the caller's, maybe shared: groupcommit.py)."""
        now = iso(self._now())
        if is_test(r.directive_id):
            return self._tests.result(tx, r, now)
        d = tx.one("SELECT * FROM directives WHERE directive_id = ?", r.directive_id)
        if d is None or d["device_id"] != r.device_id:
            raise NotFound(f"no directive {r.directive_id} for device {r.device_id}")
        if tx.one("SELECT 1 FROM results WHERE directive_id = ?", r.directive_id):
            return {"status": "duplicate"}
        tx.execute(
            "INSERT INTO results VALUES (?,?,?,?,?)",
            r.directive_id,
            r.device_id,
            r.outcome,
            now,
            r.model_dump_json(),
        )
        state = "remediated" if r.outcome == "applied" else "remediation_failed"
        tx.execute("UPDATE devices SET last_seen = ?, state = ? WHERE device_id = ?", now, state, r.device_id)
        audit.record(
            tx,
            now,
            "result.received",
            r.device_id,
            r.device_id,
            r.directive_id,
            {"outcome": r.outcome, "error": r.error, "actions": [a.status for a in r.actions]},
        )
        if r.outcome != "applied":
            self._set_outcome(tx, r.directive_id, "failed", f"the agent reported {r.outcome}")
        return {"status": "recorded"}

    def accept_health(self, raw: bytes) -> dict[str, Any]:
        """Check, store and acknowledge a healthy boot, in a transaction of its own."""
        h = self.check_health(raw)
        with self._store.tx() as tx:
            answer = self.write_health(tx, h)
        self.written(h.device_id, "Health", answer)
        return answer

    def check_health(self, raw: bytes) -> Health:
        """A health report's envelope, signature, signer and budget."""
        return self._devices.open_message(raw, Health).message

    def write_health(self, tx: Tx, h: Health) -> dict[str, Any]:
        """Store a checked health report inside ``tx`` (maybe shared: groupcommit.py)."""
        now = iso(self._now())
        # The inventory stands apart from the boot it came with: a device asked for its whole
        # inventory sends this boot's health report again, with it (a duplicate otherwise).
        inventory = (
            {} if h.inventory is None else {"inventory": apply_update(tx, h.device_id, h.inventory, now)}
        )
        inventory |= self._tests.health_answer(tx, h.device_id)
        if tx.one("SELECT 1 FROM health WHERE device_id = ? AND boot_id = ?", h.device_id, h.boot_id):
            return {"status": "duplicate", **inventory}
        tx.execute("INSERT INTO health VALUES (?,?,?,?)", h.device_id, h.boot_id, h.directive_id, now)
        tx.execute(
            "UPDATE devices SET last_seen = ?, state = 'healthy', recovery_attempts = 0 WHERE device_id = ?",
            now,
            h.device_id,
        )
        audit.record(
            tx,
            now,
            "health.reported",
            h.device_id,
            h.device_id,
            h.directive_id,
            {"boot_id": h.boot_id, "kernel": h.kernel_version},
        )
        if is_test(h.directive_id):
            self._tests.passed(tx, h.device_id, str(h.directive_id), now)
        elif h.directive_id:
            d = tx.one("SELECT device_id FROM directives WHERE directive_id = ?", h.directive_id)
            if d is not None and d["device_id"] == h.device_id:
                self._set_outcome(tx, h.directive_id, "succeeded", "healthy boot after applying")
        return {"status": "recorded", **inventory}

    def fail_pending(self, tx: Tx, device_id: str, report_id: str, why: str) -> None:
        """The device reported a crash again (``report_id``): every directive it was served
        before and has no outcome yet did not work."""
        for served in tx.all(
            "SELECT directive_id FROM directives WHERE device_id = ? AND outcome = 'pending' "
            "AND report_id <> ?",
            device_id,
            report_id,
        ):
            self._set_outcome(tx, served["directive_id"], "failed", why)

    def _set_outcome(self, tx: Tx, directive_id: str, outcome: str, why: str) -> None:
        """Record a served device's verdict once, and let its rollout react."""
        d = tx.one("SELECT * FROM directives WHERE directive_id = ?", directive_id)
        if d is None or d["outcome"] != "pending":
            return
        now = iso(self._now())
        tx.execute(
            "UPDATE directives SET outcome = ?, outcome_at = ? WHERE directive_id = ?",
            outcome,
            now,
            directive_id,
        )
        audit.record(tx, now, f"directive.{outcome}", "server", d["device_id"], directive_id, {"why": why})
        self._rollouts.judge(tx, d["remediation_id"])

    # ---------------------------------------------------------------- views

    def results(self, user: User, device_id: str) -> list[DeviceResult]:
        require(user, Operation.READ_FLEET)
        return [
            DeviceResult.model_validate(dict(r))
            for r in self._store.all(
                "SELECT directive_id, outcome, received_at FROM results WHERE device_id = ? "
                "ORDER BY received_at",
                device_id,
            )
        ]


def _not_on_device(actions: Sequence[Any], due: Due) -> list[str]:
    """Quarantine targets that the device's inventory shows with other content, or not at all
    in a folder it inventoried: the fix is not for this device (it may have the good file)."""
    targets = [a for a in actions if isinstance(a, QuarantineFile)]
    if not targets:
        return []
    have, folders = due.inventory()
    return [
        a.path for a in targets if a.path.rpartition("/")[0] in folders and (a.path, a.sha256) not in have
    ]
