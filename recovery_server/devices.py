"""Devices and their enrollment: which keys the server trusts, and for which device.

1. An admin makes a fleet enrollment token (kept only as its sha256).
2. A healthy device enrolls its Ed25519 key: the enrollment is signed by that very key (proof
   of possession) and carries the token. A device id keeps its first key for good: a key
   cannot be replaced over the network, so a stolen token cannot take over a device.
3. Before each report the device asks for a challenge: a server nonce that works once and
   only until ``nonce_ttl`` has passed (``use_nonce``).
4. Every later message of the device is opened against its enrolled key (``open_message``),
   and must name the device whose key signed it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from recovery_agent.protocol import envelope, keys
from recovery_agent.protocol.admin import Device, EnrollmentToken
from recovery_agent.protocol.envelope import EnvelopeError, Verified
from recovery_agent.protocol.wire import Challenge, SignedMessage

from . import audit
from .access import Operation, User, require
from .errors import BadRequest, Conflict, NotFound, Unauthorized
from .store import Store, Tx, iso, parse_iso, token_sha256

M = TypeVar("M", bound=SignedMessage)


class DeviceKeyring(Mapping[str, Ed25519PublicKey]):
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
        return int(self._store.scalar("SELECT count(*) FROM devices"))


class Devices:
    def __init__(self, store: Store, now: Callable[[], datetime], nonce_ttl: timedelta) -> None:
        self._store = store
        self._now = now
        self._nonce_ttl = nonce_ttl
        self.keyring = DeviceKeyring(store)

    def create_enrollment_token(
        self, user: User, label: str = "fleet", valid_for: timedelta | None = None
    ) -> EnrollmentToken:
        require(user, Operation.MAKE_ENROLLMENT_TOKEN)
        token = "enr_" + secrets.token_urlsafe(24)
        now = self._now()
        expires = iso(now + valid_for) if valid_for else None
        with self._store.tx() as tx:
            tx.execute(
                "INSERT INTO enrollment_tokens VALUES (?,?,?,?,?)",
                token_sha256(token),
                label,
                user.name,
                iso(now),
                expires,
            )
            audit.record(tx, iso(now), "enrollment_token.created", user.name, subject=label)
        return EnrollmentToken(token=token, label=label)

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
        now = self._now()
        nonce = secrets.token_urlsafe(24)
        expires = now + self._nonce_ttl
        with self._store.tx() as tx:
            if tx.one("SELECT 1 FROM devices WHERE device_id = ?", device_id) is None:
                raise NotFound(
                    f"device {device_id!r} is not enrolled: enroll it while it is healthy "
                    "(recovery-agent enroll)"
                )
            tx.execute("DELETE FROM nonces WHERE expires_at < ? AND used_at IS NULL", iso(now))
            tx.execute("INSERT INTO nonces VALUES (?,?,?,?,NULL)", nonce, device_id, iso(now), iso(expires))
        return Challenge(nonce=nonce, expires_at=expires)

    def use_nonce(self, tx: Tx, device_id: str, nonce: str) -> None:
        """Spend the challenge ``nonce`` of ``device_id``, inside the report's transaction."""
        now = self._now()
        n = tx.one("SELECT * FROM nonces WHERE nonce = ?", nonce)
        if n is None or n["device_id"] != device_id:
            raise Unauthorized("unknown challenge nonce: ask for a fresh one (POST /v1/challenge)")
        if n["used_at"] is not None:
            raise Conflict("challenge nonce already used: a replayed report was refused")
        if parse_iso(n["expires_at"]) <= now:
            raise Unauthorized("challenge nonce expired: ask for a fresh one")
        tx.execute("UPDATE nonces SET used_at = ? WHERE nonce = ?", iso(now), nonce)

    def open_message(self, raw: bytes, model: type[M]) -> Verified[M]:
        """The device message in ``raw``, verified against the enrolled key that signed it;
        refused unless it names the device that key belongs to."""
        try:
            verified = envelope.open_envelope(raw, model, self.keyring)
        except EnvelopeError as exc:
            raise (Unauthorized if isinstance(exc, envelope.UnknownKey) else BadRequest)(str(exc)) from None
        signer = self._store.scalar("SELECT device_id FROM devices WHERE key_id = ?", verified.key_id)
        named = getattr(verified.message, "device_id", None)
        if signer != named:
            raise Unauthorized(
                f"{model.__name__} names device {named!r} but is signed by the key of {signer!r}"
            )
        return verified

    # ---------------------------------------------------------------- views

    def devices(self, user: User) -> list[Device]:
        require(user, Operation.READ_FLEET)
        return [
            Device.model_validate(dict(r))
            for r in self._store.all(
                "SELECT device_id, hostname, key_id, enrolled_at, last_seen, state, recovery_attempts "
                "FROM devices ORDER BY device_id"
            )
        ]
