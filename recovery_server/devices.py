"""Devices and their enrollment: which keys the server trusts, for which device, since when.

1. An admin makes an enrollment token (``create_enrollment_token``). It is shown once and kept
   only as its sha256; its id (``et-`` and the start of that hash) names it from then on. It
   enrolls devices for a day unless the admin says otherwise (at most a year), any number of
   them or ``max_uses``; an admin lists and revokes tokens. Each of these is audited.
2. A healthy device enrolls its Ed25519 key (``enroll``): the enrollment is signed by that very
   key (proof of possession) and carries a token that has not expired, been used up or been
   revoked. A new device spends one use of its token; the same key enrolling again is answered
   ``already_enrolled`` and spends nothing.
3. A device id keeps its key. Another key for a known id is refused over the network (409),
   whoever holds a token, and the refusal names the fix: an admin gives the id its new key
   (``replace_key``): a reinstalled machine, or a real machine whose id a stranger took first.
   The old key stops working at once, and what it was served no longer counts in any rollout.
   An admin can also revoke a device (``revoke``): every message it signs is then refused, and
   its outcomes stop counting, until an admin gives it a key again.
4. A device records which token enrolled it and when its key was enrolled, as the sequence
   number of that entry in the audit log (``enrolled_seq``): one order for everything the
   server did, so "enrolled before this rollout started" has one answer on every server
   process (``rollout.py`` counts only those devices).
5. Before each report the device asks for a challenge (``challenges.py``): a server nonce
   that works once and only until ``nonce_ttl`` has passed.
6. Every later message of the device is opened against its enrolled key (``open_message``),
   must name the device whose key signed it, and is refused if that device was revoked; then
   its rate limit is checked (``limits.py``).

Why so: a token lets machines enroll; it cannot vouch that a machine is real, and it is the one
secret every machine being set up must hold, so it leaks. A holder of a token alone can
therefore add devices, but cannot take over an enrolled id, cannot outlive the token's expiry,
uses or revocation, and cannot move a rollout with devices enrolled after the rollout started
(they are served the fix, as a real new machine must be, but their outcomes do not count).
Devices enrolled with a token before a rollout started do count: the token's limits bound that
window, every device shows the token that enrolled it, and an admin who finds fakes revokes
them, which takes them out of every gate.
"""

from __future__ import annotations

import functools
import json
import secrets
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from recovery_agent.protocol import envelope, keys
from recovery_agent.protocol.admin import (
    DEFAULT_TOKEN_LIFETIME_S,
    MAX_DEVICE_ROWS,
    MAX_TOKEN_LIFETIME_S,
    Device,
    DeviceDetail,
    EnrollmentToken,
    EnrollmentTokenInfo,
    EnrollmentTokenState,
)
from recovery_agent.protocol.envelope import EnvelopeError, Verified
from recovery_agent.protocol.wire import SignedMessage

from . import audit, rollout
from .access import Operation, User, require
from .errors import BadRequest, Conflict, NotFound, Unauthorized
from .limits import DeviceRateLimits
from .store import Reader, Row, Store, Tx, iso, parse_iso, token_sha256

M = TypeVar("M", bound=SignedMessage)

TOKEN_PREFIX = "enr_"


class DeviceKeyring(Mapping[str, Ed25519PublicKey]):
    """The enrolled device keys, looked up by key id as the envelope names them. Make one per
    message: it reads each key's device row once and keeps it (``signer``), so opening a
    message costs one query however often the envelope code asks."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._rows: dict[str, Row | None] = {}

    def signer(self, kid: str) -> Row | None:
        """The device row of the key ``kid``, or None if no device has it."""
        if kid not in self._rows:
            self._rows[kid] = self._store.one("SELECT * FROM devices WHERE key_id = ?", kid)
        return self._rows[kid]

    def __getitem__(self, kid: str) -> Ed25519PublicKey:
        row = self.signer(kid)
        if row is None:
            raise KeyError(kid)
        return _public_key(row["public_key"])

    def __contains__(self, kid: object) -> bool:
        return isinstance(kid, str) and self.signer(kid) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(r["key_id"] for r in self._store.all("SELECT key_id FROM devices"))

    def __len__(self) -> int:
        return int(self._store.scalar("SELECT count(*) FROM devices"))


@functools.lru_cache(maxsize=4096)
def _public_key(b64: str) -> Ed25519PublicKey:
    """A device's public key as an object (immutable, so shared between messages)."""
    return keys.public_from_b64(b64)


class Devices:
    def __init__(self, store: Store, now: Callable[[], datetime], limits: DeviceRateLimits) -> None:
        self._store = store
        self._now = now
        self.limits = limits

    # ---------------------------------------------------------------- enrollment tokens

    def create_enrollment_token(
        self,
        user: User,
        label: str = "fleet",
        valid_for: timedelta = timedelta(seconds=DEFAULT_TOKEN_LIFETIME_S),
        max_uses: int | None = None,
    ) -> EnrollmentToken:
        """A new token, shown this once: it enrolls devices until ``valid_for`` has passed,
        at most ``max_uses`` of them (any number if None), or until an admin revokes it."""
        require(user, Operation.MAKE_ENROLLMENT_TOKEN)
        if not timedelta(minutes=1) <= valid_for <= timedelta(seconds=MAX_TOKEN_LIFETIME_S):
            raise BadRequest(
                f"an enrollment token lives from a minute to {MAX_TOKEN_LIFETIME_S // 86400} days, "
                f"not {valid_for}: give another --expires"
            )
        if max_uses is not None and max_uses < 1:
            raise BadRequest(f"max_uses must be 1 or more, not {max_uses}")
        token = TOKEN_PREFIX + secrets.token_urlsafe(24)
        digest = token_sha256(token)
        token_id = token_id_of(digest)
        now = self._now()
        expires = now + valid_for
        with self._store.tx() as tx:
            tx.execute(
                "INSERT INTO enrollment_tokens(token_sha256, label, created_by, created_at, expires_at, "
                "token_id, max_uses) VALUES (?,?,?,?,?,?,?)",
                digest,
                label,
                user.name,
                iso(now),
                iso(expires),
                token_id,
                max_uses,
            )
            audit.record(
                tx,
                iso(now),
                "enrollment_token.created",
                user.name,
                subject=token_id,
                detail={"label": label, "expires_at": iso(expires), "max_uses": max_uses},
            )
        return EnrollmentToken(
            token=token, token_id=token_id, label=label, expires_at=expires, max_uses=max_uses
        )

    def enrollment_tokens(self, user: User) -> list[EnrollmentTokenInfo]:
        require(user, Operation.READ_ENROLLMENT_TOKENS)
        now = self._now()
        return [
            _token_view(r, now)
            for r in self._store.all("SELECT * FROM enrollment_tokens ORDER BY created_at, token_id")
        ]

    def revoke_enrollment_token(self, user: User, token_id: str) -> EnrollmentTokenInfo:
        """From now on the token enrolls nobody; the devices it enrolled stay (an admin revokes
        those one by one: ``revoke``; ``devices`` shows which token enrolled each)."""
        require(user, Operation.REVOKE_ENROLLMENT_TOKEN)
        now = self._now()
        with self._store.tx() as tx:
            row = tx.one("SELECT * FROM enrollment_tokens WHERE token_id = ?", token_id)
            if row is None:
                raise NotFound(
                    f"no enrollment token {token_id}: list them with recovery-admin enrollment-token list"
                )
            if row["revoked_at"]:
                raise Conflict(f"enrollment token {token_id} was revoked already, by {row['revoked_by']}")
            tx.execute(
                "UPDATE enrollment_tokens SET revoked_at = ?, revoked_by = ? WHERE token_id = ?",
                iso(now),
                user.name,
                token_id,
            )
            audit.record(
                tx,
                iso(now),
                "enrollment_token.revoked",
                user.name,
                subject=token_id,
                detail={"label": row["label"], "used": row["used"]},
            )
            row = tx.one("SELECT * FROM enrollment_tokens WHERE token_id = ?", token_id)
        assert row is not None
        return _token_view(row, now)

    # ---------------------------------------------------------------- enrollment

    def enroll(self, raw: bytes) -> dict[str, Any]:
        try:
            verified = envelope.open_enrollment(raw)
        except EnvelopeError as exc:
            raise BadRequest(str(exc)) from None
        e = verified.message
        now = self._now()
        with self._store.tx() as tx:
            tok = tx.one(
                "SELECT * FROM enrollment_tokens WHERE token_sha256 = ?", token_sha256(e.enrollment_token)
            )
            _check_token(tok, now, new_device=False)
            assert tok is not None
            existing = tx.one("SELECT * FROM devices WHERE device_id = ?", e.device_id)
            if existing is not None:
                if existing["revoked_at"]:
                    raise Unauthorized(_revoked(existing, e.public_key))
                if existing["key_id"] == verified.key_id:
                    return {"device_id": e.device_id, "key_id": verified.key_id, "status": "already_enrolled"}
                raise Conflict(
                    f"device {e.device_id} is enrolled with another key (key {existing['key_id'][:16]}…, "
                    f"since {existing['enrolled_at']}), and a key cannot be replaced over the network. "
                    f"If this machine is {e.device_id} (reinstalled, or another machine took its id "
                    f"first), an admin gives it this key: recovery-admin device rekey {e.device_id} "
                    f"--public-key {e.public_key}; then enroll again"
                )
            other = tx.scalar("SELECT device_id FROM devices WHERE key_id = ?", verified.key_id)
            if other is not None:
                raise Conflict(f"this key is enrolled for device {other}: make a key per device")
            _check_token(tok, now, new_device=True)
            seq = audit.record(
                tx,
                iso(now),
                "device.enrolled",
                e.device_id,
                e.device_id,
                detail={"key_id": verified.key_id, "token": tok["token_id"]},
            )
            tx.execute(
                "INSERT INTO devices(device_id, public_key, key_id, hostname, enrolled_at, enrolled_seq, "
                "enrolled_with) VALUES (?,?,?,?,?,?,?)",
                e.device_id,
                e.public_key,
                verified.key_id,
                e.hostname,
                iso(now),
                seq,
                tok["token_id"],
            )
            tx.execute("UPDATE enrollment_tokens SET used = used + 1 WHERE token_id = ?", tok["token_id"])
        return {"device_id": e.device_id, "key_id": verified.key_id, "status": "enrolled"}

    def open_message(self, raw: bytes, model: type[M]) -> Verified[M]:
        """The device message in ``raw``, verified against the enrolled key that signed it;
        refused unless it names the device that key belongs to, and that device is not revoked."""
        keyring = DeviceKeyring(self._store)
        try:
            verified = envelope.open_envelope(raw, model, keyring)
        except EnvelopeError as exc:
            raise (Unauthorized if isinstance(exc, envelope.UnknownKey) else BadRequest)(str(exc)) from None
        signer = keyring.signer(verified.key_id)
        named = getattr(verified.message, "device_id", None)
        if signer is None or signer["device_id"] != named:
            raise Unauthorized(
                f"{model.__name__} names device {named!r} but is signed by the key of "
                f"{signer['device_id'] if signer else None!r}"
            )
        if signer["revoked_at"]:
            raise Unauthorized(_revoked(signer))
        # Only now, with the device proven, may its budget be looked at (limits.py); the
        # caller spends it once the message is stored.
        self.limits.check(signer["device_id"], model.__name__)
        return verified

    def refuse_revoked(self, db: Reader, device_id: str) -> None:
        """Raise Unauthorized if an admin revoked ``device_id`` (a poll names its device only
        through its report)."""
        row = db.one("SELECT * FROM devices WHERE device_id = ?", device_id)
        if row is not None and row["revoked_at"]:
            raise Unauthorized(_revoked(row))

    # ---------------------------------------------------------------- an admin's word on a device

    def replace_key(self, user: User, device_id: str, public_key: str) -> Device:
        """``user`` gives a known device id a new key: a reinstalled machine, a real machine
        whose id another took first, or a revoked device let back in. The old key stops
        working; what it was served no longer counts in any rollout, and the new key counts
        only in rollouts that start from now on."""
        require(user, Operation.REPLACE_DEVICE_KEY)
        try:
            kid = keys.key_id(keys.public_from_b64(public_key))
        except ValueError as exc:
            raise BadRequest(f"public_key: {exc}") from None
        now = iso(self._now())
        with self._store.tx() as tx:
            dev = tx.one("SELECT * FROM devices WHERE device_id = ?", device_id)
            if dev is None:
                raise NotFound(
                    f"no device {device_id}: a new device enrolls itself with an enrollment token "
                    "(recovery-agent enroll)"
                )
            other = tx.scalar(
                "SELECT device_id FROM devices WHERE key_id = ? AND device_id <> ?", kid, device_id
            )
            if other is not None:
                raise Conflict(f"this key is enrolled for device {other}: each device needs its own key")
            if dev["key_id"] == kid and not dev["revoked_at"]:
                raise Conflict(f"device {device_id} has this key already")
            seq = audit.record(
                tx,
                now,
                "device.key_replaced",
                user.name,
                device_id,
                detail={"old_key_id": dev["key_id"], "key_id": kid, "was_revoked": bool(dev["revoked_at"])},
            )
            tx.execute(
                "UPDATE devices SET public_key = ?, key_id = ?, enrolled_at = ?, enrolled_seq = ?, "
                "enrolled_with = NULL, revoked_at = NULL, revoked_by = NULL WHERE device_id = ?",
                public_key,
                kid,
                now,
                seq,
                device_id,
            )
            _forget_key(tx, device_id)
        return self._device(device_id)

    def revoke(self, user: User, device_id: str) -> Device:
        """``user`` revokes a device: every message it signs is refused from now on, and its
        outcomes no longer count in any rollout, until an admin gives it a key again."""
        require(user, Operation.REVOKE_DEVICE)
        now = iso(self._now())
        with self._store.tx() as tx:
            dev = tx.one("SELECT * FROM devices WHERE device_id = ?", device_id)
            if dev is None:
                raise NotFound(f"no device {device_id}: list them with recovery-admin devices")
            if dev["revoked_at"]:
                raise Conflict(f"device {device_id} was revoked already, by {dev['revoked_by']}")
            tx.execute(
                "UPDATE devices SET revoked_at = ?, revoked_by = ? WHERE device_id = ?",
                now,
                user.name,
                device_id,
            )
            _forget_key(tx, device_id)
            audit.record(
                tx,
                now,
                "device.revoked",
                user.name,
                device_id,
                detail={"key_id": dev["key_id"], "enrolled_with": dev["enrolled_with"]},
            )
        return self._device(device_id)

    # ---------------------------------------------------------------- views

    def devices(self, user: User, limit: int | None, after: str = "") -> list[Device]:
        """Up to ``limit`` devices (None: all), by id, the first after ``after``."""
        require(user, Operation.READ_FLEET)
        sql = f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id > ? ORDER BY device_id"
        rows = (
            self._store.all(sql, after) if limit is None else self._store.all(sql + " LIMIT ?", after, limit)
        )
        return [_device_view(r) for r in rows]

    def device(self, device_id: str) -> Device:
        """One device's view (it must exist)."""
        return self._device(device_id)

    def detail(self, user: User, device_id: str) -> DeviceDetail:
        """A device with its latest reports, directives and results, newest first (the
        dashboard's device page): at most ``MAX_DEVICE_ROWS`` of each, never a report's
        diagnostics."""
        require(user, Operation.READ_FLEET)
        row = self._store.one(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = ?", device_id)
        if row is None:
            raise NotFound(f"no device {device_id}: list them with recovery-admin devices")
        reports = self._store.all(
            "SELECT r.report_id, r.incident_id, r.received_at, i.title FROM reports r "
            "JOIN incidents i ON i.incident_id = r.incident_id WHERE r.device_id = ? "
            f"ORDER BY r.received_at DESC, r.report_id DESC LIMIT {MAX_DEVICE_ROWS}",
            device_id,
        )
        directives = self._store.all(
            "SELECT directive_id, remediation_id, report_id, issued_at, wave, outcome, outcome_at "
            "FROM directives WHERE device_id = ? "
            f"ORDER BY issued_at DESC, directive_id DESC LIMIT {MAX_DEVICE_ROWS}",
            device_id,
        )
        # Through the device's directives (indexed by device), each result once.
        results = self._store.all(
            "SELECT res.directive_id, res.outcome, res.received_at, res.payload FROM results res "
            "JOIN directives d ON d.directive_id = res.directive_id "
            "WHERE d.device_id = ? AND res.device_id = d.device_id "
            f"ORDER BY res.received_at DESC, res.directive_id DESC LIMIT {MAX_DEVICE_ROWS}",
            device_id,
        )
        return DeviceDetail.model_validate(
            {
                **dict(row),
                "reports_total": self._store.scalar(
                    "SELECT count(*) FROM reports WHERE device_id = ?", device_id
                ),
                "directives_total": self._store.scalar(
                    "SELECT count(*) FROM directives WHERE device_id = ?", device_id
                ),
                "reports": [dict(r) for r in reports],
                "directives": [dict(d) for d in directives],
                "results": [
                    {
                        "directive_id": r["directive_id"],
                        "outcome": r["outcome"],
                        "received_at": r["received_at"],
                        "error": json.loads(r["payload"]).get("error"),
                    }
                    for r in results
                ],
            }
        )

    def _device(self, device_id: str) -> Device:
        row = self._store.one(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = ?", device_id)
        assert row is not None, "read after the change that found it"
        return _device_view(row)


_DEVICE_COLUMNS = (
    "device_id, hostname, key_id, enrolled_at, enrolled_with, last_seen, state, recovery_attempts, "
    "revoked_at, recovery_test_requested_at, recovery_test_passed_at"
)


def _device_view(row: Row) -> Device:
    return Device.model_validate(dict(row))


def token_id_of(digest: str) -> str:
    """The public id of the token whose sha256 is ``digest`` (schema step 3 names the tokens
    made before it the same way)."""
    return "et-" + digest[:12]


def _token_state(row: Row, now: datetime) -> EnrollmentTokenState:
    if row["revoked_at"]:
        return "revoked"
    if not row["expires_at"] or parse_iso(row["expires_at"]) <= now:
        return "expired"
    if row["max_uses"] is not None and row["used"] >= row["max_uses"]:
        return "used_up"
    return "active"


def _token_view(row: Row, now: datetime) -> EnrollmentTokenInfo:
    return EnrollmentTokenInfo.model_validate(
        {
            **dict(row),
            "expires_at": row["expires_at"] or row["created_at"],
            "state": _token_state(row, now),
        }
    )


_GET_A_TOKEN = "get a new one from an admin (recovery-admin enrollment-token create)"


def _check_token(row: Row | None, now: datetime, *, new_device: bool) -> None:
    """Raise Unauthorized, naming why and the fix, unless the token may enroll a device now
    (a ``new_device`` needs a use left; a device enrolling its own key again does not)."""
    if row is None:
        raise Unauthorized(f"enrollment token not valid: {_GET_A_TOKEN}")
    state = _token_state(row, now)
    name = f"enrollment token {row['token_id']} ({row['label']})"
    if state == "revoked":
        raise Unauthorized(
            f"{name} was revoked by {row['revoked_by']} on {row['revoked_at']}: {_GET_A_TOKEN}"
        )
    if state == "expired":
        raise Unauthorized(f"{name} expired on {row['expires_at'] or row['created_at']}: {_GET_A_TOKEN}")
    if state == "used_up" and new_device:
        raise Unauthorized(f"{name} has enrolled the {row['max_uses']} devices it allowed: {_GET_A_TOKEN}")


def _revoked(device: Row, public_key: str = "KEY") -> str:
    return (
        f"device {device['device_id']} was revoked by {device['revoked_by']} on {device['revoked_at']}: "
        "its messages are refused. If it is a machine of this fleet, an admin gives it a key again: "
        f"recovery-admin device rekey {device['device_id']} --public-key {public_key}"
    )


def _forget_key(tx: Tx, device_id: str) -> None:
    """The device's key is no longer trusted (revoked or replaced): its open challenges go,
    and nothing it was served counts in any rollout (it may have been a stranger's)."""
    tx.execute("DELETE FROM nonces WHERE device_id = ? AND used_at IS NULL", device_id)
    rollout.stop_counting(tx, device_id)
