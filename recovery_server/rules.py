"""Known-bad rules: content a person has judged bad once, acted on at once everywhere after
(CrowdStrike's known-bad list; QMR's auto remediation).

1. An operator publishes a rule: a file whose path matches ``path_pattern`` (fnmatch on the
   path relative to the OS root) and whose content hashes to ``sha256`` is bad; the fix is to
   quarantine it. Optionally a rollout plan for the incidents it will fix.
2. Approvers other than its author approve it, M of N, like a remediation. One who registered
   a key signs a ``RuleApproval`` of exactly this rule (``envelope.rule_digest``); the server
   checks it and keeps it. At M approvals the rule is active.
3. From then on a report whose files include matching content, in an incident with no
   approved fix, gets one with no new approval: a remediation made from the rule for that
   incident (its author the rule's, ``rule_id`` set), through the rule's rollout plan if it
   has one, audited as ``rule.applied``. Incidents already open are looked at once, when the
   rule becomes active. Each directive made from it says so in the audit log, and carries the
   rule and its approvers' signatures: a device that pins approver keys checks that M of them
   signed this rule and that every action follows from it (``envelope.verify_approvals``), so
   the device-side M-of-N guarantee holds without a new approval.
4. Revoking a rule revokes the remediations made from it and their rollouts: no device is
   served from it again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from recovery_agent.protocol import envelope
from recovery_agent.protocol.admin import Approval, RolloutPlan, Rule, RuleRequest
from recovery_agent.protocol.errors import describe_validation
from recovery_agent.protocol.wire import Diagnostics, KnownBadRule, QuarantineFile, RuleApproval

from . import audit
from .access import Operation, User, require, require_not_author
from .errors import BadRequest, Conflict, NotFound
from .fleetfiles import listed_files
from .remediations import approved_remediation, revoke_remediation
from .rollout import start_rollout
from .store import Reader, Row, Store, Tx, iso, new_id
from .users import signed_approval


def known_bad_rule(row: Row) -> KnownBadRule:
    """The rule as devices see it (and its approvers sign it)."""
    return KnownBadRule(
        rule_id=row["rule_id"], title=row["title"], path_pattern=row["path_pattern"], sha256=row["sha256"]
    )


def rule_approvals(db: Reader, rule_id: str) -> list[Any]:
    """The approvers' signed RuleApprovals a directive made from the rule carries."""
    return [
        json.loads(a["envelope"])
        for a in db.all(
            "SELECT envelope FROM rule_approvals WHERE rule_id = ? AND envelope IS NOT NULL "
            "ORDER BY approved_at, approver",
            rule_id,
        )
    ]


class Rules:
    def __init__(self, store: Store, now: Callable[[], datetime], changed: Callable[[], None]) -> None:
        self._store = store
        self._now = now
        self._changed = changed

    # ---------------------------------------------------------------- people

    def create(self, user: User, request: RuleRequest | Mapping[str, Any]) -> Rule:
        require(user, Operation.WRITE_REMEDIATION)
        try:
            r = request if isinstance(request, RuleRequest) else RuleRequest.model_validate(request)
        except ValidationError as exc:
            raise BadRequest(f"known-bad rule: {describe_validation(exc)}") from None
        now = iso(self._now())
        rule_id = new_id("kbr")
        with self._store.tx() as tx:
            tx.execute(
                "INSERT INTO known_bad_rules(rule_id, title, path_pattern, sha256, author, "
                "required_approvals, plan, created_at) VALUES (?,?,?,?,?,?,?,?)",
                rule_id,
                r.title,
                r.path_pattern,
                r.sha256,
                user.name,
                r.required_approvals,
                r.rollout.model_dump_json() if r.rollout else None,
                now,
            )
            audit.record(
                tx,
                now,
                "rule.created",
                user.name,
                subject=rule_id,
                detail={"title": r.title, "path_pattern": r.path_pattern, "sha256": r.sha256},
            )
        return self._view(rule_id)

    def approve(self, user: User, rule_id: str, signed: Mapping[str, Any] | None = None) -> Rule:
        """Count ``user``'s approval; at the rule's required count it is active, and the open
        incidents whose reports list its content get its fix."""
        require(user, Operation.APPROVE_REMEDIATION)
        now = iso(self._now())
        with self._store.tx() as tx:
            row = _rule_row(tx, rule_id)
            if row["status"] == "revoked":
                raise Conflict(f"{rule_id} was revoked; publish a new rule")
            require_not_author(user, row["author"], rule_id)
            if tx.one("SELECT 1 FROM rule_approvals WHERE rule_id = ? AND approver = ?", rule_id, user.name):
                raise Conflict(f"{user.name} already approved {rule_id}")
            tx.execute(
                "INSERT INTO rule_approvals(rule_id, approver, approved_at, envelope) VALUES (?,?,?,?)",
                rule_id,
                user.name,
                now,
                _checked_signature(tx, user, row, signed),
            )
            count = tx.scalar("SELECT count(*) FROM rule_approvals WHERE rule_id = ?", rule_id)
            audit.record(
                tx,
                now,
                "rule.approval",
                user.name,
                subject=rule_id,
                detail={"approvals": count, "required": row["required_approvals"]},
            )
            if count >= row["required_approvals"] and row["status"] == "pending":
                tx.execute("UPDATE known_bad_rules SET status = 'active' WHERE rule_id = ?", rule_id)
                audit.record(tx, now, "rule.active", user.name, subject=rule_id)
                tx.cache.pop(_ACTIVE, None)
                self._apply_open(tx, now)
        self._changed()
        return self._view(rule_id)

    def revoke(self, user: User, rule_id: str) -> Rule:
        """Stop the rule, and every fix made from it."""
        require(user, Operation.REVOKE_REMEDIATION)
        now = iso(self._now())
        with self._store.tx() as tx:
            row = _rule_row(tx, rule_id)
            if row["status"] == "revoked":
                raise Conflict(f"{rule_id} was revoked already, by {row['revoked_by']}")
            tx.execute(
                "UPDATE known_bad_rules SET status = 'revoked', revoked_at = ?, revoked_by = ? "
                "WHERE rule_id = ?",
                now,
                user.name,
                rule_id,
            )
            made = [
                r["remediation_id"]
                for r in tx.all(
                    "SELECT remediation_id FROM remediations WHERE rule_id = ? AND status <> 'revoked'",
                    rule_id,
                )
            ]
            for rid in made:
                revoke_remediation(tx, now, user.name, rid, {"rule": rule_id})
            audit.record(tx, now, "rule.revoked", user.name, subject=rule_id, detail={"remediations": made})
        self._changed()
        return self._view(rule_id)

    def rules(self, user: User) -> list[Rule]:
        require(user, Operation.READ_FLEET)
        return [
            self._view(r["rule_id"])
            for r in self._store.all("SELECT rule_id FROM known_bad_rules ORDER BY created_at, rule_id")
        ]

    # ---------------------------------------------------------------- reports

    def apply(self, tx: Tx, incident_id: str, d: Diagnostics, now: str) -> str | None:
        """A report just stored in ``tx``: if its files include content an active rule names
        and its incident has no approved fix, make one from the rule. The remediation's id,
        or None."""
        rules = self._active(tx)
        if not rules:
            return None
        files = [(f.path, f.sha256) for f in (*d.drivers, *d.channel_files, *d.driver_store)]
        return self._fix(tx, incident_id, files, rules, now)

    def _active(self, tx: Tx) -> list[KnownBadRule]:
        """The active rules, read once per transaction (a group commit's reports share it)."""
        if _ACTIVE not in tx.cache:
            tx.cache[_ACTIVE] = [
                known_bad_rule(r)
                for r in tx.all("SELECT * FROM known_bad_rules WHERE status = 'active' ORDER BY created_at")
            ]
        return list(tx.cache[_ACTIVE])

    def _fix(
        self, tx: Tx, incident_id: str, files: list[tuple[str, str]], rules: list[KnownBadRule], now: str
    ) -> str | None:
        hits = [(rule, path, sha) for rule in rules for path, sha in files if rule.matches(path, sha)]
        if not hits or approved_remediation(tx, incident_id) is not None:
            return None
        rule = hits[0][0]
        actions = [
            QuarantineFile(path=path, sha256=sha)
            for path, sha in sorted({(p, s) for r, p, s in hits if r.rule_id == rule.rule_id})
        ]
        row = tx.one("SELECT * FROM known_bad_rules WHERE rule_id = ?", rule.rule_id)
        assert row is not None, "an active rule was read in this transaction"
        rid = new_id("rem")
        tx.execute(
            "INSERT INTO remediations(remediation_id, incident_id, title, actions, author, "
            "required_approvals, status, created_at, rule_id) VALUES (?,?,?,?,?,?,'approved',?,?)",
            rid,
            incident_id,
            f"{rule.title} (known-bad rule {rule.rule_id})"[:256],
            json.dumps([a.model_dump(mode="json") for a in actions]),
            row["author"],
            row["required_approvals"],
            now,
            rule.rule_id,
        )
        audit.record(
            tx,
            now,
            "rule.applied",
            "server",
            subject=rid,
            detail={"rule": rule.rule_id, "incident": incident_id, "paths": [a.path for a in actions]},
        )
        if row["plan"]:
            start_rollout(tx, now, f"rule:{rule.rule_id}", rid, RolloutPlan.model_validate_json(row["plan"]))
        return rid

    def _apply_open(self, tx: Tx, now: str) -> None:
        """A rule became active: the incidents with no approved fix whose reports list its
        content get one now (their devices may be waiting in recovery)."""
        rules = self._active(tx)
        for inc in tx.all(
            "SELECT incident_id FROM incidents WHERE incident_id NOT IN "
            "(SELECT incident_id FROM remediations WHERE status = 'approved' AND incident_id IS NOT NULL) "
            "ORDER BY first_seen"
        ):
            for report in tx.all(
                "SELECT payload FROM reports WHERE incident_id = ? ORDER BY received_at DESC",
                inc["incident_id"],
            ):
                files = [(f["path"], f["sha256"]) for f in listed_files(report["payload"])]
                if self._fix(tx, inc["incident_id"], files, rules, now):
                    break

    # ---------------------------------------------------------------- views

    def _view(self, rule_id: str) -> Rule:
        row = self._store.one("SELECT * FROM known_bad_rules WHERE rule_id = ?", rule_id)
        if row is None:
            raise NotFound(f"no known-bad rule {rule_id}")
        approvals = [
            Approval(approver=a["approver"], approved_at=a["approved_at"], signed=a["envelope"] is not None)
            for a in self._store.all(
                "SELECT approver, approved_at, envelope FROM rule_approvals WHERE rule_id = ? "
                "ORDER BY approved_at",
                rule_id,
            )
        ]
        uses = [
            r["remediation_id"]
            for r in self._store.all(
                "SELECT remediation_id FROM remediations WHERE rule_id = ? ORDER BY created_at", rule_id
            )
        ]
        return Rule.model_validate(
            {
                **dict(row),
                "approvals": approvals,
                "rollout": json.loads(row["plan"]) if row["plan"] else None,
                "uses": uses,
            }
        )


_ACTIVE = "rules.active"


def _rule_row(tx: Tx, rule_id: str) -> Row:
    row = tx.one("SELECT * FROM known_bad_rules WHERE rule_id = ?", rule_id)
    if row is None:
        raise NotFound(f"no known-bad rule {rule_id}: list them with recovery-admin rule list")
    return row


def _checked_signature(tx: Tx, user: User, row: Row, signed: Mapping[str, Any] | None) -> str | None:
    """The approver's signed RuleApproval as it will be kept, or None for a person with no
    registered key; refused unless it is theirs and covers exactly this rule."""
    v = signed_approval(
        tx, user, signed, RuleApproval, f"recovery-admin rule approve {row['rule_id']} --key YOUR_KEY"
    )
    if v is None:
        return None
    if v.message.rule_id != row["rule_id"]:
        raise BadRequest("signed approval names another rule or person")
    if v.message.rule_sha256 != envelope.rule_digest(known_bad_rule(row)):
        raise BadRequest(
            "signed approval covers another rule than this one: fetch it again and check what you sign"
        )
    return json.dumps(signed)
