"""Challenges: the server's one-time nonces that a device's next diagnostics must carry, made
without writing anything and without saying whether the device exists.

``POST /v1/challenge`` is the one device route that is not signed: a device in its recovery
environment asks for a challenge, then signs diagnostics that carry it, so a recorded report
cannot be replayed. Were the server to look the device up and store each nonce, the route
would tell anyone which device ids are enrolled (404 or 200) and write a row per anonymous
call. Instead:

1. ``issue`` answers every well-formed device id alike, known or not, and writes nothing. The
   nonce is ``base64url(expires | random | tag)``: the expiry (8 bytes, seconds since the
   epoch, now + ``nonce_ttl``), 16 random bytes (two challenges in one second differ), and the
   first 16 bytes of HMAC-SHA256 over the device id, the expiry and the random bytes.
2. ``spend`` runs inside the diagnostics' write transaction, after the envelope was verified
   against the enrolled key of the device it names: the tag must verify for that device, the
   expiry must not have passed, and the nonce must not be in the ``nonces`` table; then it is
   recorded there. Only a report signed by an enrolled key ever writes a nonce.
3. A recorded nonce is needed only until it expires (after that it fails the expiry check
   first); ``retention.py`` deletes expired ones.

The HMAC key is derived (HKDF-SHA256) from the server's signing key, so it lives where that
key lives, in the data directory and never in the database: a copy of the database cannot mint
challenges, and every server process behind a load balancer, which must share the signing key
anyway (devices pin it), accepts the challenges of the others. Replacing the server key only
invalidates the challenges of the last ``nonce_ttl``; their devices ask again.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from recovery_agent.protocol.keys import SigningKey
from recovery_agent.protocol.wire import Challenge

from .errors import Conflict, Unauthorized
from .store import Tx, iso

_CONTEXT = b"qmr challenge nonce v1"
_EXPIRES, _RANDOM, _TAG = 8, 16, 16


def challenge_key(server_key: SigningKey) -> bytes:
    """The HMAC key for challenges, derived from the server's signing key (and only from it)."""
    raw = server_key.private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_CONTEXT).derive(raw)


class Challenges:
    def __init__(self, key: bytes, now: Callable[[], datetime], ttl: timedelta) -> None:
        self._key = key
        self._now = now
        self._ttl = ttl

    def _tag(self, device_id: str, body: bytes) -> bytes:
        message = _CONTEXT + b"\n" + device_id.encode() + b"\n" + body
        return hmac.new(self._key, message, hashlib.sha256).digest()[:_TAG]

    def issue(self, device_id: str) -> Challenge:
        """A nonce for ``device_id``'s next diagnostics; the same for any id, nothing stored."""
        expires = self._now() + self._ttl
        body = int(expires.timestamp()).to_bytes(_EXPIRES, "big") + secrets.token_bytes(_RANDOM)
        nonce = base64.urlsafe_b64encode(body + self._tag(device_id, body)).rstrip(b"=").decode()
        return Challenge(nonce=nonce, expires_at=expires)

    def spend(self, tx: Tx, device_id: str, nonce: str) -> None:
        """Spend ``nonce`` for diagnostics signed by ``device_id``, inside their transaction:
        Unauthorized if it was not issued for this device or has expired, Conflict if used."""
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except (binascii.Error, ValueError):
            raw = b""
        body, tag = raw[: _EXPIRES + _RANDOM], raw[_EXPIRES + _RANDOM :]
        if len(raw) != _EXPIRES + _RANDOM + _TAG or not hmac.compare_digest(tag, self._tag(device_id, body)):
            raise Unauthorized("unknown challenge nonce: ask for a fresh one (POST /v1/challenge)")
        expires = datetime.fromtimestamp(int.from_bytes(body[:_EXPIRES], "big"), UTC)
        now = self._now()
        if expires <= now:
            raise Unauthorized("challenge nonce expired: ask for a fresh one (POST /v1/challenge)")
        spent = tx.execute(
            "INSERT INTO nonces(nonce, device_id, issued_at, expires_at, used_at) VALUES (?,?,?,?,?) "
            "ON CONFLICT (nonce) DO NOTHING",
            nonce,
            device_id,
            iso(expires - self._ttl),
            iso(expires),
            iso(now),
        )
        if spent.rowcount != 1:
            raise Conflict("challenge nonce already used: a replayed message was refused")
