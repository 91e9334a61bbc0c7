"""Remediations and their approvals: the fix people write for an incident, and who let it out.

1. An operator writes a remediation: declarative actions only (``wire.Action``: quarantine a
   file by content, restore a file from the driver store, disable a driver), never a script,
   and how many approvals it needs.
2. Approvers approve it; its author never counts. A person who registered a key
   (``users.py``) must send their signed RemediationApproval of exactly these actions: the
   server checks it, keeps it, and every directive made from the remediation carries it, so
   devices that pin approver keys check the people's signatures themselves.
3. With enough approvals it is approved: directives may be made from it (``directives.py``),
   and a rollout set on it starts its first wave's soak time now.
4. An approver may revoke it at any time; its rollout stops with it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from pydantic import TypeAdapter, ValidationError

from recovery_agent.protocol import envelope
from recovery_agent.protocol.admin import Approval, Remediation
from recovery_agent.protocol.errors import describe_validation
from recovery_agent.protocol.wire import REMEDIATION_ACTIONS, Action, RemediationApproval

from . import audit
from .access import Operation, User, require, require_not_author
from .errors import BadRequest, Conflict, NotFound
from .store import Reader, Row, Store, Tx, iso, new_id
from .users import signed_approval

_ACTIONS = TypeAdapter(list[Action])


def approved_remediation(db: Reader, incident_id: str) -> Row | None:
    """The newest approved remediation for the incident: the one devices are served."""
    return db.one(
        "SELECT * FROM remediations WHERE incident_id = ? AND status = 'approved' "
        "ORDER BY created_at DESC LIMIT 1",
        incident_id,
    )


def revoke_remediation(
    tx: Tx, now: str, actor: str, remediation_id: str, detail: dict[str, Any] | None = None
) -> None:
    """Revoke a remediation and its rollout inside ``tx``: nothing is served from it again."""
    tx.execute("UPDATE remediations SET status = 'revoked' WHERE remediation_id = ?", remediation_id)
    tx.execute("UPDATE rollouts SET state = 'revoked' WHERE remediation_id = ?", remediation_id)
    audit.record(tx, now, "remediation.revoked", actor, subject=remediation_id, detail=detail or "")


class Remediations:
    def __init__(self, store: Store, now: Callable[[], datetime], changed: Callable[[], None]) -> None:
        self._store = store
        self._now = now
        self._changed = changed

    def create(
        self,
        user: User,
        *,
        title: str,
        actions: list[Any],
        incident_id: str | None,
        required_approvals: int = 1,
    ) -> Remediation:
        require(user, Operation.WRITE_REMEDIATION)
        try:
            parsed = _ACTIONS.validate_python(actions)
        except ValidationError as exc:
            raise BadRequest(f"actions do not fit the protocol: {describe_validation(exc)}") from None
        if not parsed:
            raise BadRequest("a remediation needs at least one action")
        if any(a.type not in REMEDIATION_ACTIONS for a in parsed):
            raise BadRequest(
                "a remediation cannot hold a recovery_test action: the server makes those for a "
                "device's recovery test (recovery-admin device test DEVICE)"
            )
        if not 1 <= required_approvals <= 16:
            raise BadRequest("required_approvals must be 1 to 16")
        if not title or len(title) > 256:
            raise BadRequest("title must be 1 to 256 characters")
        now = iso(self._now())
        rid = new_id("rem")
        with self._store.tx() as tx:
            if incident_id and tx.one("SELECT 1 FROM incidents WHERE incident_id = ?", incident_id) is None:
                raise NotFound(f"no incident {incident_id}: list them with recovery-admin incidents")
            tx.execute(
                "INSERT INTO remediations(remediation_id, incident_id, title, actions, author, "
                "required_approvals, status, created_at) VALUES (?,?,?,?,?,?,'pending',?)",
                rid,
                incident_id,
                title,
                _ACTIONS.dump_json(parsed).decode(),
                user.name,
                required_approvals,
                now,
            )
            audit.record(
                tx,
                now,
                "remediation.created",
                user.name,
                subject=rid,
                detail={"incident": incident_id, "title": title},
            )
        return self._view(rid)

    def approve(
        self, user: User, remediation_id: str, signed: Mapping[str, Any] | None = None
    ) -> Remediation:
        """Count ``user``'s approval. A person with a registered key must send their signed
        RemediationApproval of exactly these actions; the server checks it and keeps it, and
        every directive made from the remediation carries it to the devices."""
        require(user, Operation.APPROVE_REMEDIATION)
        now = iso(self._now())
        with self._store.tx() as tx:
            rem = tx.one("SELECT * FROM remediations WHERE remediation_id = ?", remediation_id)
            if rem is None:
                raise NotFound(f"no remediation {remediation_id}")
            if rem["status"] == "revoked":
                raise Conflict(f"{remediation_id} was revoked; write a new one")
            require_not_author(user, rem["author"], remediation_id)
            if tx.one(
                "SELECT 1 FROM approvals WHERE remediation_id = ? AND approver = ?", remediation_id, user.name
            ):
                raise Conflict(f"{user.name} already approved {remediation_id}")
            signed_json = _checked_signature(tx, user, rem, signed)
            tx.execute(
                "INSERT INTO approvals(remediation_id, approver, approved_at, envelope) VALUES (?,?,?,?)",
                remediation_id,
                user.name,
                now,
                signed_json,
            )
            count = tx.scalar("SELECT count(*) FROM approvals WHERE remediation_id = ?", remediation_id)
            audit.record(
                tx,
                now,
                "remediation.approval",
                user.name,
                subject=remediation_id,
                detail={"approvals": count, "required": rem["required_approvals"]},
            )
            if count >= rem["required_approvals"] and rem["status"] == "pending":
                tx.execute(
                    "UPDATE remediations SET status = 'approved' WHERE remediation_id = ?", remediation_id
                )
                # A rollout set before the approval starts its first soak now, not when it was set.
                tx.execute(
                    "UPDATE rollouts SET wave_started_at = ? WHERE remediation_id = ?", now, remediation_id
                )
                audit.record(tx, now, "remediation.approved", user.name, subject=remediation_id)
        self._changed()
        return self._view(remediation_id)

    def revoke(self, user: User, remediation_id: str) -> Remediation:
        require(user, Operation.REVOKE_REMEDIATION)
        with self._store.tx() as tx:
            if tx.one("SELECT 1 FROM remediations WHERE remediation_id = ?", remediation_id) is None:
                raise NotFound(f"no remediation {remediation_id}")
            revoke_remediation(tx, iso(self._now()), user.name, remediation_id)
        self._changed()
        return self._view(remediation_id)

    # ---------------------------------------------------------------- views

    def remediation(self, user: User, remediation_id: str) -> Remediation:
        require(user, Operation.READ_FLEET)
        return self._view(remediation_id)

    def remediations(self, user: User) -> list[Remediation]:
        require(user, Operation.READ_FLEET)
        return [
            self._view(r["remediation_id"])
            for r in self._store.all("SELECT remediation_id FROM remediations ORDER BY created_at")
        ]

    def _view(self, remediation_id: str) -> Remediation:
        rem = self._store.one("SELECT * FROM remediations WHERE remediation_id = ?", remediation_id)
        if rem is None:
            raise NotFound(f"no remediation {remediation_id}")
        approvals = [
            Approval(approver=a["approver"], approved_at=a["approved_at"], signed=a["envelope"] is not None)
            for a in self._store.all(
                "SELECT approver, approved_at, envelope FROM approvals WHERE remediation_id = ? "
                "ORDER BY approved_at",
                remediation_id,
            )
        ]
        return Remediation.model_validate(
            {**dict(rem), "actions": _ACTIONS.validate_json(rem["actions"]), "approvals": approvals}
        )


def _checked_signature(tx: Tx, user: User, rem: Row, signed: Mapping[str, Any] | None) -> str | None:
    """The approver's signed RemediationApproval as it will be kept, or None for a person
    with no registered key; refused unless it is theirs and covers exactly these actions."""
    v = signed_approval(
        tx,
        user,
        signed,
        RemediationApproval,
        f"recovery-admin remediation approve {rem['remediation_id']} --key YOUR_KEY",
    )
    if v is None:
        return None
    if v.message.remediation_id != rem["remediation_id"]:
        raise BadRequest("signed approval names another remediation or person")
    if v.message.actions_sha256 != envelope.actions_digest(json.loads(rem["actions"])):
        raise BadRequest(
            "signed approval covers other actions than this remediation's: "
            "fetch it again and check what you sign"
        )
    return json.dumps(signed)
