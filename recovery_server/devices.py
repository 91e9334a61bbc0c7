"""Devices and their enrollment: which keys the server trusts, and for which device.

1. An admin makes a fleet enrollment token (kept only as its sha256).
2. A healthy device enrolls its Ed25519 key: the enrollment is signed by that very key (proof
   of possession) and carries the token. A device id keeps its first key for good: a key
   cannot be replaced over the network, so a stolen token cannot take over a device.
3. Before each report the device asks for a challenge (``challenges.py``): a server nonce
   that works once and only until ``nonce_ttl`` has passed.
4. Every later message of the device is opened against its enrolled key (``open_message``),
   and must name the device whose key signed it; then its rate limit is checked (``limits.py``).
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
from recovery_agent.protocol.wire import SignedMessage

from . import audit
from .access import Operation, User, require
from .errors import BadRequest, Conflict, Unauthorized
from .limits import DeviceRateLimits
from .store import Store, iso, parse_iso, token_sha256

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
    def __init__(self, store: Store, now: Callable[[], datetime], limits: DeviceRateLimits) -> None:
        self._store = store
        self._now = now
        self.limits = limits
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
        # Only now, with the device proven, may its budget be looked at (limits.py); the
        # caller spends it once the message is stored.
        self.limits.check(signer, model.__name__)
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
