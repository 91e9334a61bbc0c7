"""What the recovery server does, without HTTP: the rules of the device and admin APIs.

Device side: a device enrolls its key with a fleet enrollment token; asks for a challenge;
sends diagnostics signed by its key and carrying that challenge (each nonce works once);
the report joins the incident of its crash signature; the device then polls for a directive.
A directive is made only from a remediation that people other than its author approved, for
the incident of that very report, and only if the files it names are on that device with the
reported content. It is signed by the server key and bound to the device, the agent's nonce,
the hash of the diagnostics and an expiry. The device reports the result, and the OS reports
its next healthy boot.

Admin side: users with roles (viewer < operator < approver < admin) and per-person tokens;
operators write remediations (declarative actions only); approvers approve; the author never
counts as an approver.

Every change is one store transaction and leaves an event for the timeline.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import TypeAdapter, ValidationError

from recovery_agent.protocol import envelope, keys
from recovery_agent.protocol.envelope import EnvelopeError
from recovery_agent.protocol.keys import SigningKey
from recovery_agent.protocol.wire import (
    Action,
    Challenge,
    Diagnostics,
    DiagnosticsReceipt,
    Directive,
    DirectivePoll,
    Health,
    QuarantineFile,
    RemediationApproval,
    Result,
)

from . import audit, catalog
from .errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized
from .rollout import RolloutPlan, WaveCounts, decide, wave_of
from .store import Store

ROLES = ("viewer", "operator", "approver", "admin")
_ACTIONS = TypeAdapter(list[Action])


def iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


@dataclass(frozen=True)
class User:
    name: str
    role: str

    def can(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


class _DeviceKeyring(Mapping[str, Ed25519PublicKey]):
    """The enrolled device keys, looked up by key id as the envelope names them."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __getitem__(self, kid: str) -> Ed25519PublicKey:
        row = self._store.one("SELECT public_key FROM devices WHERE key_id = ?", kid)
        if row is None:
            raise KeyError(kid)
        return keys.public_from_b64(row["public_key"])

    def __contains__(self, kid: object) -> bool:
        return (
            isinstance(kid, str)
            and self._store.one("SELECT 1 FROM devices WHERE key_id = ?", kid) is not None
        )

    def __iter__(self) -> Iterator[str]:
        return iter(r["key_id"] for r in self._store.all("SELECT key_id FROM devices"))

    def __len__(self) -> int:
        return self._store.one("SELECT count(*) FROM devices")[0]


@dataclass
class ServiceSettings:
    nonce_ttl: timedelta = timedelta(minutes=10)
    directive_ttl: timedelta = timedelta(hours=1)


@dataclass
class RecoveryService:
    store: Store
    server_key: SigningKey
    settings: ServiceSettings = field(default_factory=ServiceSettings)
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    on_change: Callable[[], None] = lambda: None

    def __post_init__(self) -> None:
        self._keyring = _DeviceKeyring(self.store)

    def now(self) -> datetime:
        return self.clock().replace(microsecond=0)

    # ------------------------------------------------------------------ users and tokens

    def create_user(self, name: str, role: str, actor: str = "setup") -> str:
        if role not in ROLES:
            raise BadRequest(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
        if (
            not name
            or len(name) > 64
            or not name.replace("-", "").replace("_", "").replace(".", "").isalnum()
        ):
            raise BadRequest("user name must be 1 to 64 letters, digits, '.', '-' or '_'")
        token = "qmr_" + secrets.token_urlsafe(32)
        with self.store.tx() as tx:
            if tx.one("SELECT 1 FROM users WHERE name = ?", name):
                raise Conflict(f"user {name!r} exists already")
            tx.execute(
                "INSERT INTO users(name, role, token_sha256, created_at) VALUES (?,?,?,?)",
                name,
                role,
                _sha(token),
                iso(self.now()),
            )
            audit.record(tx, iso(self.now()), "user.created", actor, subject=name, detail={"role": role})
        return token

    def authenticate(self, token: str | None) -> User:
        if not token:
            raise Unauthorized("no admin token: pass --token or set RECOVERY_TOKEN")
        row = self.store.one("SELECT name, role FROM users WHERE token_sha256 = ?", _sha(token))
        if row is None:
            raise Unauthorized(
                "admin token not recognised: ask an admin for a token (recovery-admin user add)"
            )
        return User(row["name"], row["role"])

    @staticmethod
    def require(user: User, role: str) -> None:
        if not user.can(role):
            raise Forbidden(f"{user.name} is {user.role}; this needs the {role} role or higher")

    def create_enrollment_token(
        self, user: User, label: str = "fleet", valid_for: timedelta | None = None
    ) -> str:
        self.require(user, "admin")
        token = "enr_" + secrets.token_urlsafe(24)
        expires = iso(self.now() + valid_for) if valid_for else None
        with self.store.tx() as tx:
            tx.execute(
                "INSERT INTO enrollment_tokens VALUES (?,?,?,?,?)",
                _sha(token),
                label,
                user.name,
                iso(self.now()),
                expires,
            )
            audit.record(tx, iso(self.now()), "enrollment_token.created", user.name, subject=label)
        return token

    # ------------------------------------------------------------------ device API

    def enroll(self, raw: bytes) -> dict[str, Any]:
        try:
            verified = envelope.open_enrollment(raw)
        except EnvelopeError as exc:
            raise BadRequest(str(exc)) from None
        e = verified.message
        now = self.now()
        with self.store.tx() as tx:
            tok = tx.one("SELECT * FROM enrollment_tokens WHERE token_sha256 = ?", _sha(e.enrollment_token))
            if tok is None or (tok["expires_at"] and parse_iso(tok["expires_at"]) <= now):
                raise Unauthorized(
                    "enrollment token not valid or expired: get one from an admin "
                    "(recovery-admin enrollment-token)"
                )
            existing = tx.one("SELECT * FROM devices WHERE device_id = ?", e.device_id)
            if existing is not None:
                if existing["key_id"] == verified.key_id:
                    return {"device_id": e.device_id, "key_id": verified.key_id, "status": "already_enrolled"}
                raise Conflict(
                    f"device {e.device_id} is enrolled with another key, and a key cannot "
                    "be replaced over the network: enroll the reinstalled machine under "
                    "a new device id"
                )
            if tx.one("SELECT 1 FROM devices WHERE key_id = ?", verified.key_id):
                raise Conflict("this key is enrolled for another device: make a key per device")
            tx.execute(
                "INSERT INTO devices(device_id, public_key, key_id, hostname, enrolled_at) "
                "VALUES (?,?,?,?,?)",
                e.device_id,
                e.public_key,
                verified.key_id,
                e.hostname,
                iso(now),
            )
            audit.record(
                tx, iso(now), "device.enrolled", e.device_id, e.device_id, detail={"key_id": verified.key_id}
            )
        return {"device_id": e.device_id, "key_id": verified.key_id, "status": "enrolled"}

    def challenge(self, device_id: str) -> Challenge:
        now = self.now()
        nonce = secrets.token_urlsafe(24)
        expires = now + self.settings.nonce_ttl
        with self.store.tx() as tx:
            if tx.one("SELECT 1 FROM devices WHERE device_id = ?", device_id) is None:
                raise NotFound(
                    f"device {device_id!r} is not enrolled: enroll it while it is healthy "
                    "(recovery-agent enroll)"
                )
            tx.execute("DELETE FROM nonces WHERE expires_at < ? AND used_at IS NULL", iso(now))
            tx.execute("INSERT INTO nonces VALUES (?,?,?,?,NULL)", nonce, device_id, iso(now), iso(expires))
        return Challenge(nonce=nonce, expires_at=expires)

    def accept_diagnostics(self, raw: bytes) -> DiagnosticsReceipt:
        try:
            verified = envelope.open_envelope(raw, Diagnostics, self._keyring)
        except EnvelopeError as exc:
            raise (Unauthorized if isinstance(exc, envelope.UnknownKey) else BadRequest)(str(exc)) from None
        d = verified.message
        now = self.now()
        poll_token = secrets.token_urlsafe(24)
        with self.store.tx() as tx:
            dev = tx.one("SELECT * FROM devices WHERE key_id = ?", verified.key_id)
            if dev["device_id"] != d.device_id:
                raise Unauthorized(
                    f"diagnostics name device {d.device_id!r} but are signed by the "
                    f"key of {dev['device_id']!r}"
                )
            n = tx.one("SELECT * FROM nonces WHERE nonce = ?", d.server_nonce)
            if n is None or n["device_id"] != d.device_id:
                raise Unauthorized("unknown challenge nonce: ask for a fresh one (POST /v1/challenge)")
            if n["used_at"] is not None:
                raise Conflict("challenge nonce already used: a replayed report was refused")
            if parse_iso(n["expires_at"]) <= now:
                raise Unauthorized("challenge nonce expired: ask for a fresh one")
            tx.execute("UPDATE nonces SET used_at = ? WHERE nonce = ?", iso(now), d.server_nonce)

            sig = d.crash
            incident_id = "INC-" + sig.id[:12]
            if tx.one("SELECT 1 FROM incidents WHERE incident_id = ?", incident_id) is None:
                tx.execute(
                    "INSERT INTO incidents VALUES (?,?,?,?,?,?,?,?,?,0)",
                    incident_id,
                    sig.id,
                    sig.kind.value,
                    sig.title,
                    sig.guilty_module,
                    sig.guilty_frame,
                    sig.channel_file,
                    iso(now),
                    iso(now),
                )
                audit.record(
                    tx,
                    iso(now),
                    "incident.opened",
                    d.device_id,
                    d.device_id,
                    incident_id,
                    {"title": sig.title},
                )
            tx.execute(
                "UPDATE incidents SET last_seen = ?, report_count = report_count + 1 WHERE incident_id = ?",
                iso(now),
                incident_id,
            )
            report_id = _new_id("rpt")
            tx.execute(
                "INSERT INTO reports VALUES (?,?,?,?,?,?,?,?,?)",
                report_id,
                d.device_id,
                incident_id,
                verified.payload_sha256,
                d.agent_nonce,
                _sha(poll_token),
                iso(now),
                verified.payload.decode(),
                raw.decode(),
            )
            # The agent's last attempt: unless a fix lands now, a person must recover it.
            state = (
                "needs_manual" if d.boot.recovery_attempts >= d.boot.max_recovery_attempts else "recovering"
            )
            tx.execute(
                "UPDATE devices SET last_seen = ?, state = ?, recovery_attempts = ? WHERE device_id = ?",
                iso(now),
                state,
                d.boot.recovery_attempts,
                d.device_id,
            )
            audit.record(
                tx,
                iso(now),
                "diagnostics.received",
                d.device_id,
                d.device_id,
                report_id,
                {
                    "incident": incident_id,
                    "title": sig.title,
                    "boot_count": d.boot.boot_count,
                    "recovery_attempts": d.boot.recovery_attempts,
                },
            )
            if state == "needs_manual":
                audit.record(
                    tx,
                    iso(now),
                    "device.needs_manual",
                    d.device_id,
                    d.device_id,
                    report_id,
                    {"recovery_attempts": d.boot.recovery_attempts},
                )
            # A device that was served a fix and is back in recovery: the fix did not work.
            for served in tx.all(
                "SELECT directive_id FROM directives WHERE device_id = ? AND "
                "outcome = 'pending' AND report_id <> ?",
                d.device_id,
                report_id,
            ):
                self._set_outcome(
                    tx, served["directive_id"], "failed", f"the device failed to boot again ({sig.title})"
                )
        return DiagnosticsReceipt(
            report_id=report_id,
            incident_id=incident_id,
            diagnostics_sha256=verified.payload_sha256,
            poll_token=poll_token,
        )

    def poll(self, report_id: str, poll_token: str) -> DirectivePoll:
        """One look for a directive for this report; the HTTP layer repeats it (long poll).

        Read-only until a directive is due; then, inside one write transaction, the remediation
        and its rollout are read again so that two server processes agree on who is served."""
        report = self.store.one("SELECT * FROM reports WHERE report_id = ?", report_id)
        if report is None or not secrets.compare_digest(report["poll_token_sha256"], _sha(poll_token)):
            raise NotFound("no such report, or wrong poll token")
        existing = self.store.one("SELECT envelope FROM directives WHERE report_id = ?", report_id)
        if existing:
            return DirectivePoll(status="directive", envelope=json.loads(existing["envelope"]))
        verdict = self._due(self.store, report)
        if verdict != "issue":
            return DirectivePoll(status=verdict, retry_after_s=1)
        with self.store.tx() as tx:
            again = tx.one("SELECT envelope FROM directives WHERE report_id = ?", report_id)
            if again:  # another poller or process won the race; serve theirs
                return DirectivePoll(status="directive", envelope=json.loads(again["envelope"]))
            verdict = self._due(tx, report)
            if verdict != "issue":
                return DirectivePoll(status=verdict, retry_after_s=1)
            return self._issue(tx, report)

    def _due(self, db, report) -> str:
        """'issue', 'pending' (ask again) or 'none', for this report, now."""
        rem = self._approved_remediation(db, report["incident_id"])
        if rem is None:
            revoked = db.one(
                "SELECT 1 FROM remediations WHERE incident_id = ? AND status = 'revoked'",
                report["incident_id"],
            )
            pending = db.one(
                "SELECT 1 FROM remediations WHERE incident_id = ? AND status = 'pending'",
                report["incident_id"],
            )
            return "none" if revoked and not pending else "pending"
        diagnostics = Diagnostics.model_validate_json(report["payload"])
        if _not_on_device(_ACTIONS.validate_json(rem["actions"]), diagnostics):
            return "none"
        ro = db.one("SELECT * FROM rollouts WHERE remediation_id = ?", rem["remediation_id"])
        if ro is None or ro["state"] == "completed":
            return "issue"
        if ro["state"] == "revoked":
            return "none"
        if ro["state"] != "active":
            return "pending"  # paused or halted: wait; a person may resume it
        plan = RolloutPlan.model_validate_json(ro["plan"])
        wave = wave_of(plan, ro["rollout_id"], report["device_id"])
        return "issue" if wave <= ro["current_wave"] else "pending"

    @staticmethod
    def _approved_remediation(db, incident_id: str):
        return db.one(
            "SELECT * FROM remediations WHERE incident_id = ? AND status = 'approved' "
            "ORDER BY created_at DESC LIMIT 1",
            incident_id,
        )

    def _issue(self, tx, report) -> DirectivePoll:
        rem = self._approved_remediation(tx, report["incident_id"])
        actions = _ACTIONS.validate_json(rem["actions"])
        ro = tx.one("SELECT * FROM rollouts WHERE remediation_id = ?", rem["remediation_id"])
        wave = (
            wave_of(RolloutPlan.model_validate_json(ro["plan"]), ro["rollout_id"], report["device_id"])
            if ro
            else None
        )
        now = self.now()
        approvals = [
            json.loads(r["envelope"])
            for r in tx.all(
                "SELECT envelope FROM approvals WHERE remediation_id = ? AND envelope IS NOT NULL "
                "ORDER BY approved_at, approver",
                rem["remediation_id"],
            )
        ]
        directive = Directive(
            directive_id=_new_id("dir"),
            device_id=report["device_id"],
            agent_nonce=report["agent_nonce"],
            diagnostics_sha256=report["diagnostics_sha256"],
            remediation_id=rem["remediation_id"],
            remediation_title=rem["title"],
            issued_at=now,
            expires_at=now + self.settings.directive_ttl,
            actions=actions,
            approvals=approvals,
        )
        env = envelope.seal(directive, self.server_key)
        tx.execute(
            "INSERT INTO directives(directive_id, device_id, report_id, remediation_id, issued_at, "
            "expires_at, envelope, wave) VALUES (?,?,?,?,?,?,?,?)",
            directive.directive_id,
            directive.device_id,
            report["report_id"],
            rem["remediation_id"],
            iso(now),
            iso(directive.expires_at),
            json.dumps(env),
            wave,
        )
        audit.record(
            tx,
            iso(now),
            "directive.issued",
            "server",
            directive.device_id,
            directive.directive_id,
            {"remediation": rem["remediation_id"], "report": report["report_id"], "wave": wave},
        )
        return DirectivePoll(status="directive", envelope=env)

    def _set_outcome(self, tx, directive_id: str, outcome: str, why: str) -> None:
        """Record a served device's verdict once, and let its rollout react."""
        d = tx.one("SELECT * FROM directives WHERE directive_id = ?", directive_id)
        if d is None or d["outcome"] != "pending":
            return
        now = iso(self.now())
        tx.execute(
            "UPDATE directives SET outcome = ?, outcome_at = ? WHERE directive_id = ?",
            outcome,
            now,
            directive_id,
        )
        audit.record(tx, now, f"directive.{outcome}", "server", d["device_id"], directive_id, {"why": why})
        ro = tx.one("SELECT * FROM rollouts WHERE remediation_id = ?", d["remediation_id"])
        if ro is not None:
            self._evaluate(tx, ro)

    def accept_result(self, raw: bytes) -> dict[str, Any]:
        r = self._open_device_message(raw, Result)
        now = self.now()
        with self.store.tx() as tx:
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
                iso(now),
                r.model_dump_json(),
            )
            state = "remediated" if r.outcome == "applied" else "remediation_failed"
            tx.execute(
                "UPDATE devices SET last_seen = ?, state = ? WHERE device_id = ?",
                iso(now),
                state,
                r.device_id,
            )
            audit.record(
                tx,
                iso(now),
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
        h = self._open_device_message(raw, Health)
        now = self.now()
        with self.store.tx() as tx:
            if tx.one("SELECT 1 FROM health WHERE device_id = ? AND boot_id = ?", h.device_id, h.boot_id):
                return {"status": "duplicate"}
            tx.execute(
                "INSERT INTO health VALUES (?,?,?,?)", h.device_id, h.boot_id, h.directive_id, iso(now)
            )
            tx.execute(
                "UPDATE devices SET last_seen = ?, state = 'healthy', recovery_attempts = 0 "
                "WHERE device_id = ?",
                iso(now),
                h.device_id,
            )
            audit.record(
                tx,
                iso(now),
                "health.reported",
                h.device_id,
                h.device_id,
                h.directive_id,
                {"boot_id": h.boot_id, "kernel": h.kernel_version},
            )
            if h.directive_id:
                d = tx.one("SELECT device_id FROM directives WHERE directive_id = ?", h.directive_id)
                if d is not None and d["device_id"] == h.device_id:
                    self._set_outcome(tx, h.directive_id, "succeeded", "healthy boot after applying")
        return {"status": "recorded"}

    def _open_device_message(self, raw: bytes, model):
        try:
            verified = envelope.open_envelope(raw, model, self._keyring)
        except EnvelopeError as exc:
            raise (Unauthorized if isinstance(exc, envelope.UnknownKey) else BadRequest)(str(exc)) from None
        dev = self.store.one("SELECT device_id FROM devices WHERE key_id = ?", verified.key_id)
        if dev["device_id"] != verified.message.device_id:
            raise Unauthorized("message names another device than the key that signed it")
        return verified.message

    # ------------------------------------------------------------------ remediations

    def create_remediation(
        self,
        user: User,
        *,
        title: str,
        actions: list[dict] | list,
        incident_id: str | None,
        required_approvals: int = 1,
    ) -> dict[str, Any]:
        self.require(user, "operator")
        try:
            parsed = _ACTIONS.validate_python(actions)
        except ValidationError as exc:
            raise BadRequest(f"actions do not fit the protocol: {exc}") from None
        if not parsed:
            raise BadRequest("a remediation needs at least one action")
        if not 1 <= required_approvals <= 16:
            raise BadRequest("required_approvals must be 1 to 16")
        if not title or len(title) > 256:
            raise BadRequest("title must be 1 to 256 characters")
        now = self.now()
        rid = _new_id("rem")
        with self.store.tx() as tx:
            if incident_id and tx.one("SELECT 1 FROM incidents WHERE incident_id = ?", incident_id) is None:
                raise NotFound(f"no incident {incident_id}: list them with recovery-admin incidents")
            tx.execute(
                "INSERT INTO remediations VALUES (?,?,?,?,?,?,'pending',?)",
                rid,
                incident_id,
                title,
                _ACTIONS.dump_json(parsed).decode(),
                user.name,
                required_approvals,
                iso(now),
            )
            audit.record(
                tx,
                iso(now),
                "remediation.created",
                user.name,
                subject=rid,
                detail={"incident": incident_id, "title": title},
            )
        return self.remediation(rid)

    def suggest_actions(self, user: User, incident_id: str) -> dict[str, Any]:
        """A draft fix from the catalog of known fixes (catalog.py); a person still turns it
        into a remediation and others approve it."""
        self.require(user, "viewer")
        inc = self.store.one("SELECT * FROM incidents WHERE incident_id = ?", incident_id)
        if inc is None:
            raise NotFound(f"no incident {incident_id}: list them with recovery-admin incidents")
        reports = (
            Diagnostics.model_validate_json(r["payload"])
            for r in self.store.all("SELECT payload FROM reports WHERE incident_id = ?", incident_id)
        )
        proposal = catalog.propose(dict(inc), reports)
        return {
            "incident_id": incident_id,
            "title": proposal.title,
            "actions": proposal.actions,
            "why": proposal.why,
        }

    def register_key(self, user: User, public_key: str) -> dict[str, Any]:
        """A person registers their own Ed25519 key; from then on their approvals must be
        signed with it, and devices that pin it can check those signatures themselves."""
        try:
            pub = keys.public_from_b64(public_key)
        except ValueError as exc:
            raise BadRequest(f"public_key: {exc}") from None
        kid = keys.key_id(pub)
        with self.store.tx() as tx:
            row = tx.one("SELECT public_key FROM users WHERE name = ?", user.name)
            if row["public_key"] and row["public_key"] != public_key:
                raise Conflict(f"{user.name} has a key already; an admin must replace a person's key")
            tx.execute("UPDATE users SET public_key = ? WHERE name = ?", public_key, user.name)
            audit.record(
                tx,
                iso(self.now()),
                "user.key_registered",
                user.name,
                subject=user.name,
                detail={"key_id": kid},
            )
        return {"name": user.name, "key_id": kid}

    def approve(
        self, user: User, remediation_id: str, signed: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Count ``user``'s approval. A person with a registered key must send their signed
        RemediationApproval of exactly these actions; the server checks it and keeps it, and
        every directive made from the remediation carries it to the devices."""
        self.require(user, "approver")
        now = self.now()
        with self.store.tx() as tx:
            rem = tx.one("SELECT * FROM remediations WHERE remediation_id = ?", remediation_id)
            if rem is None:
                raise NotFound(f"no remediation {remediation_id}")
            if rem["status"] == "revoked":
                raise Conflict(f"{remediation_id} was revoked; write a new one")
            if rem["author"] == user.name:
                raise Forbidden(
                    f"{user.name} wrote {remediation_id} and cannot approve it: another approver must"
                )
            if tx.one(
                "SELECT 1 FROM approvals WHERE remediation_id = ? AND approver = ?", remediation_id, user.name
            ):
                raise Conflict(f"{user.name} already approved {remediation_id}")
            signed_json = self._check_signed_approval(tx, user, rem, signed)
            tx.execute(
                "INSERT INTO approvals(remediation_id, approver, approved_at, envelope) VALUES (?,?,?,?)",
                remediation_id,
                user.name,
                iso(now),
                signed_json,
            )
            count = tx.one("SELECT count(*) FROM approvals WHERE remediation_id = ?", remediation_id)[0]
            audit.record(
                tx,
                iso(now),
                "remediation.approval",
                user.name,
                subject=remediation_id,
                detail={"approvals": count, "required": rem["required_approvals"]},
            )
            if count >= rem["required_approvals"] and rem["status"] == "pending":
                tx.execute(
                    "UPDATE remediations SET status = 'approved' WHERE remediation_id = ?", remediation_id
                )
                tx.execute(
                    "UPDATE rollouts SET wave_started_at = ? WHERE remediation_id = ?",
                    iso(now),
                    remediation_id,
                )
                audit.record(tx, iso(now), "remediation.approved", user.name, subject=remediation_id)
        self.on_change()
        return self.remediation(remediation_id)

    @staticmethod
    def _check_signed_approval(tx, user: User, rem, signed: dict[str, Any] | None) -> str | None:
        row = tx.one("SELECT public_key FROM users WHERE name = ?", user.name)
        if not row["public_key"]:
            if signed is not None:
                raise BadRequest(
                    f"{user.name} has no registered key to check this signature "
                    "against: recovery-admin key create first"
                )
            return None
        if signed is None:
            raise Forbidden(
                f"{user.name} has a registered key, so approvals must be signed with it: "
                f"recovery-admin remediation approve {rem['remediation_id']} --key YOUR_KEY"
            )
        pub = keys.public_from_b64(row["public_key"])
        try:
            v = envelope.open_envelope(signed, RemediationApproval, {keys.key_id(pub): pub})
        except EnvelopeError as exc:
            raise BadRequest(f"signed approval: {exc}") from None
        a = v.message
        if a.remediation_id != rem["remediation_id"] or a.approver != user.name:
            raise BadRequest("signed approval names another remediation or person")
        if a.actions_sha256 != envelope.actions_digest(json.loads(rem["actions"])):
            raise BadRequest(
                "signed approval covers other actions than this remediation's: "
                "fetch it again and check what you sign"
            )
        return json.dumps(signed)

    def revoke(self, user: User, remediation_id: str) -> dict[str, Any]:
        self.require(user, "approver")
        with self.store.tx() as tx:
            if tx.one("SELECT 1 FROM remediations WHERE remediation_id = ?", remediation_id) is None:
                raise NotFound(f"no remediation {remediation_id}")
            tx.execute("UPDATE remediations SET status = 'revoked' WHERE remediation_id = ?", remediation_id)
            tx.execute("UPDATE rollouts SET state = 'revoked' WHERE remediation_id = ?", remediation_id)
            audit.record(tx, iso(self.now()), "remediation.revoked", user.name, subject=remediation_id)
        self.on_change()
        return self.remediation(remediation_id)

    def remediation(self, remediation_id: str) -> dict[str, Any]:
        rem = self.store.one("SELECT * FROM remediations WHERE remediation_id = ?", remediation_id)
        if rem is None:
            raise NotFound(f"no remediation {remediation_id}")
        out = dict(rem)
        out["actions"] = json.loads(rem["actions"])
        out["approvals"] = [
            {"approver": a["approver"], "approved_at": a["approved_at"], "signed": a["envelope"] is not None}
            for a in self.store.all(
                "SELECT approver, approved_at, envelope FROM approvals WHERE remediation_id = ? "
                "ORDER BY approved_at",
                remediation_id,
            )
        ]
        return out

    def remediations(self) -> list[dict[str, Any]]:
        return [
            self.remediation(r["remediation_id"])
            for r in self.store.all("SELECT remediation_id FROM remediations ORDER BY created_at")
        ]

    # ------------------------------------------------------------------ rollouts

    def create_rollout(self, user: User, remediation_id: str, plan: dict[str, Any]) -> dict[str, Any]:
        self.require(user, "operator")
        try:
            parsed = RolloutPlan.model_validate(plan)
        except ValidationError as exc:
            raise BadRequest(f"rollout plan: {exc}") from None
        now = iso(self.now())
        with self.store.tx() as tx:
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
            rollout_id = _new_id("ro")
            tx.execute(
                "INSERT INTO rollouts(rollout_id, remediation_id, plan, state, current_wave, "
                "wave_started_at, created_by, created_at) VALUES (?,?,?,'active',0,?,?,?)",
                rollout_id,
                remediation_id,
                parsed.model_dump_json(),
                now,
                user.name,
                now,
            )
            audit.record(
                tx,
                now,
                "rollout.created",
                user.name,
                subject=rollout_id,
                detail={"remediation": remediation_id, "waves": [w.name for w in parsed.waves]},
            )
        return self.rollout(rollout_id)

    def set_rollout_state(self, user: User, rollout_id: str, action: str) -> dict[str, Any]:
        """pause (operator: stopping is always safe), resume and revoke (approver)."""
        self.require(user, "operator" if action == "pause" else "approver")
        now = iso(self.now())
        with self.store.tx() as tx:
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
            else:
                raise BadRequest(f"unknown rollout action {action!r}: pause, resume or revoke")
            audit.record(
                tx,
                now,
                f"rollout.{action}",
                user.name,
                subject=rollout_id,
                detail={"from": state, "wave": ro["current_wave"]},
            )
        self.on_change()
        return self.rollout(rollout_id)

    def tick(self) -> None:
        """Re-judge every active rollout (soak time passes without any device event)."""
        for row in self.store.all("SELECT rollout_id FROM rollouts WHERE state = 'active'"):
            with self.store.tx() as tx:
                ro = tx.one("SELECT * FROM rollouts WHERE rollout_id = ?", row["rollout_id"])
                if ro["state"] == "active":
                    self._evaluate(tx, ro)

    def _evaluate(self, tx, ro) -> None:
        if ro["state"] != "active":
            return
        rem = tx.one("SELECT status FROM remediations WHERE remediation_id = ?", ro["remediation_id"])
        if rem["status"] != "approved":
            return
        plan = RolloutPlan.model_validate_json(ro["plan"])
        counts = self._wave_counts(tx, ro["remediation_id"], ro["current_wave"])
        soaked = (self.now() - parse_iso(ro["wave_started_at"])).total_seconds()
        decision = decide(plan, ro["current_wave"], counts, soaked)
        if decision.action == "halt" and ro["halt_overridden"]:
            return
        now = iso(self.now())
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
            self.on_change()
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

    @staticmethod
    def _wave_counts(db, remediation_id: str, wave: int) -> WaveCounts:
        got = {
            r[0]: r[1]
            for r in db.all(
                "SELECT outcome, count(*) FROM directives WHERE remediation_id = ? AND wave = ? "
                "GROUP BY outcome",
                remediation_id,
                wave,
            )
        }
        return WaveCounts(
            served=sum(got.values()), succeeded=got.get("succeeded", 0), failed=got.get("failed", 0)
        )

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        ro = self.store.one("SELECT * FROM rollouts WHERE rollout_id = ?", rollout_id)
        if ro is None:
            raise NotFound(f"no rollout {rollout_id}")
        plan = RolloutPlan.model_validate_json(ro["plan"])
        out = {
            k: ro[k]
            for k in (
                "rollout_id",
                "remediation_id",
                "state",
                "current_wave",
                "wave_started_at",
                "reason",
                "created_by",
                "created_at",
            )
        }
        out["plan"] = plan.model_dump()
        if ro["state"] == "active":
            counts = self._wave_counts(self.store, ro["remediation_id"], ro["current_wave"])
            soaked = (self.now() - parse_iso(ro["wave_started_at"])).total_seconds()
            out["gate"] = decide(plan, ro["current_wave"], counts, soaked).reason
        else:
            out["gate"] = ""
        out["waves"] = []
        for i, w in enumerate(plan.waves):
            c = self._wave_counts(self.store, ro["remediation_id"], i)
            out["waves"].append(
                {
                    "name": w.name,
                    "reached": i <= ro["current_wave"],
                    "served": c.served,
                    "succeeded": c.succeeded,
                    "failed": c.failed,
                    "pending": c.pending,
                }
            )
        return out

    def rollouts(self) -> list[dict[str, Any]]:
        return [
            self.rollout(r["rollout_id"])
            for r in self.store.all("SELECT rollout_id FROM rollouts ORDER BY created_at")
        ]

    # ------------------------------------------------------------------ views

    def devices(self) -> list[dict[str, Any]]:
        return [
            dict(r)
            for r in self.store.all(
                "SELECT device_id, hostname, key_id, enrolled_at, last_seen, state, recovery_attempts "
                "FROM devices ORDER BY device_id"
            )
        ]

    def incidents(self) -> list[dict[str, Any]]:
        return [
            self._incident_view(r) for r in self.store.all("SELECT * FROM incidents ORDER BY last_seen DESC")
        ]

    def _incident_view(self, row) -> dict[str, Any]:
        item = dict(row)
        item["devices"] = [
            d["device_id"]
            for d in self.store.all(
                "SELECT DISTINCT device_id FROM reports WHERE incident_id = ? ORDER BY device_id",
                row["incident_id"],
            )
        ]
        return item

    def incident(self, incident_id: str) -> dict[str, Any]:
        row = self.store.one("SELECT * FROM incidents WHERE incident_id = ?", incident_id)
        if row is None:
            raise NotFound(f"no incident {incident_id}")
        item = self._incident_view(row)
        reports = self.store.all(
            "SELECT report_id, device_id, received_at, payload FROM reports "
            "WHERE incident_id = ? ORDER BY received_at",
            incident_id,
        )
        item["reports"] = [
            {
                "report_id": r["report_id"],
                "device_id": r["device_id"],
                "received_at": r["received_at"],
                "diagnostics": json.loads(r["payload"]),
            }
            for r in reports
        ]
        return item

    def events(self, device_id: str | None = None, after: int = 0) -> list[dict[str, Any]]:
        if device_id:
            rows = self.store.all(
                "SELECT * FROM events WHERE device_id = ? AND seq > ? ORDER BY seq", device_id, after
            )
        else:
            rows = self.store.all("SELECT * FROM events WHERE seq > ? ORDER BY seq", after)
        return [dict(r) for r in rows]

    def verify_audit(self, user: User, expect_head: str | None = None) -> dict[str, Any]:
        self.require(user, "viewer")
        if expect_head is not None and not re.fullmatch(r"[0-9]{1,18}:[0-9a-f]{64}", expect_head):
            raise BadRequest("expect_head must be SEQ:SHA256 as audit verify printed it")
        return audit.verify_chain(self.store, expect_head)

    def device_results(self, device_id: str) -> list[dict[str, Any]]:
        return [
            dict(r)
            for r in self.store.all(
                "SELECT directive_id, outcome, received_at FROM results WHERE device_id = ? "
                "ORDER BY received_at",
                device_id,
            )
        ]


def _not_on_device(actions: list, diagnostics: Diagnostics) -> list[str]:
    """Quarantine targets that the device's inventory shows with other content, or not at all
    in a folder it inventoried: the fix is not for this device (it may have the good file)."""
    records = (*diagnostics.channel_files, *diagnostics.drivers)
    have = {(f.path, f.sha256) for f in records}
    folders = {f.path.rpartition("/")[0] for f in records}
    return [
        a.path
        for a in actions
        if isinstance(a, QuarantineFile)
        and a.path.rpartition("/")[0] in folders
        and (a.path, a.sha256) not in have
    ]
