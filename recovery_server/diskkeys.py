"""Encrypted disks: the recovery keys devices escrow, and their release to the recovery
environment, only as the enrolled device, only while it is in recovery.

1. **Escrow.** ``recovery-agent`` seals a fresh recovery key of the disk (its own LUKS keyslot)
   to the server's escrow key (X25519, ``sealing.seal``; context ``escrow|<device>|<slot>``)
   and sends it signed by its device key (``KeyEscrow``). The server checks that it opens, and
   keeps only the sealed text: the escrow private key is a file of its own in the data
   directory (``escrow.key``, 0600), never in the database, so a copy of the database (or its
   WAL, or a backup) holds nothing that opens a disk. A new escrow of the device replaces the
   one before it (``rotated``).
2. **Release.** In recovery, after its diagnostics, the agent asks (``KeyRequest``): signed by
   its device key, with a fresh challenge nonce, the report of this visit and an ephemeral
   X25519 key. The server releases the key, sealed to that ephemeral key for this request
   (``KeyRelease``, signed by its directive key), only if: the device is enrolled and not
   revoked (``Devices.open_message``), the nonce was issued to it and not spent (no replay),
   the report is the device's own crash report received within ``key_release_window`` (a
   recovery visit: failed boots, reported), the device has an escrowed key not revoked, the
   server's release policy is on, and the device has not had ``key_release_max`` releases in
   the last day. The device key sits on the unencrypted ``/boot``, so a stolen disk could
   sign such a request: the release is automatic only for a device whose key is sealed in a
   TPM (``tpm_sealed``, said at escrow); any other waits for a person
   (``recovery-admin device keys DEVICE --approve REL``), and the agent keeps asking until its
   time to reboot. Every request, release, refusal and approval is in the audit log.
3. **Admin.** ``recovery-admin device keys DEVICE`` shows the escrowed keys and every release;
   ``--revoke`` ends its keys (no release from then on; the device escrows a new one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from recovery_agent.protocol import envelope, sealing
from recovery_agent.protocol.admin import DiskKeysView
from recovery_agent.protocol.keys import SigningKey
from recovery_agent.protocol.wire import (
    EscrowKey,
    KeyAnswer,
    KeyEscrow,
    KeyRelease,
    KeyRequest,
    escrow_context,
    release_context,
    utcnow,
)

from . import audit
from .access import Operation, User, require
from .challenges import Challenges
from .devices import Devices
from .errors import Conflict, Forbidden, NotFound, ServerError
from .recoverytests import LOCAL_TEST
from .secretfile import SecretFile
from .store import Row, Store, Tx, iso, new_id, parse_iso

# The escrow key's file in the server's data directory.
ESCROW_KEY = "escrow.key"


class EscrowKeyError(ServerError):
    """Raised when the escrow key file cannot be used (missing, damaged, unreadable)."""


class EscrowKeyFile:
    """The escrow private key (X25519): a file of its own, 0600, next to the server key."""

    def __init__(self, private: X25519PrivateKey) -> None:
        self._private = private
        self.public_b64 = sealing.public_b64(private.public_key())

    @classmethod
    def generate(cls) -> EscrowKeyFile:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> EscrowKeyFile:
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            raise EscrowKeyError(
                f"no escrow key at {path}: run `recovery-server --data DIR init` to make one"
            ) from None
        except (OSError, ValueError, TypeError) as exc:
            raise EscrowKeyError(f"{path} cannot be used as the escrow key: {exc}") from None
        if not isinstance(key, X25519PrivateKey):
            raise EscrowKeyError(f"{path} holds no X25519 key: it is not an escrow key")
        return cls(key)

    def save(self, path: Path) -> None:
        """Write a new file (never over one: secretfile.py)."""
        pem = self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        with SecretFile(path) as f:
            f.write(pem)

    def open(self, sealed: str, context: bytes) -> bytearray:
        return sealing.open_sealed(self._private, sealed, context)


@dataclass(frozen=True)
class ReleasePolicy:
    """``on``: release (automatically to TPM-sealed devices, else once a person approved);
    ``off``: refuse every request. At most ``max_per_day`` releases per device a day, each for a
    report received within ``window``."""

    mode: str = "on"
    window: timedelta = timedelta(hours=2)
    max_per_day: int = 5


class DiskKeys:
    def __init__(
        self,
        store: Store,
        now: Callable[[], datetime],
        server_key: SigningKey,
        escrow: EscrowKeyFile | None,
        devices: Devices,
        challenges: Challenges,
        policy: ReleasePolicy,
    ) -> None:
        self._store = store
        self._now = now
        self._server_key = server_key
        self._escrow = escrow
        self._devices = devices
        self._challenges = challenges
        self.policy = policy

    def _escrow_key(self) -> EscrowKeyFile:
        if self._escrow is None:
            raise Conflict(
                "this server has no escrow key, so it keeps no disk keys: run `recovery-server --data "
                "DIR init` (it adds escrow.key and keeps the rest) and restart the server"
            )
        return self._escrow

    # ---------------------------------------------------------------- devices

    def escrow_key(self) -> dict[str, Any]:
        """The escrow public key, signed by the server's directive key (which devices pin)."""
        return envelope.seal(
            EscrowKey(public_key=self._escrow_key().public_b64, created_at=utcnow()), self._server_key
        )

    def escrow(self, raw: bytes) -> dict[str, Any]:
        escrow = self._escrow_key()
        v = self._devices.open_message(raw, KeyEscrow)
        m = v.message
        if m.escrow_key != escrow.public_b64:
            raise Conflict(
                "the key was sealed to another escrow key than this server's: fetch it again "
                "(GET /v1/escrow-key) and escrow again"
            )
        try:
            secret = escrow.open(m.sealed, escrow_context(m.device_id, m.slot))
        except sealing.SealError as exc:
            raise Conflict(f"the escrowed key does not open: {exc}") from None
        sealing.wipe(secret)  # it opens: that is all the server needed to know now
        now = iso(self._now())
        key_id = new_id("dk")
        with self._store.tx() as tx:
            # The same escrow again (a health report resent what the lab or an earlier boot
            # delivered): the key it holds, unchanged. An escrow that was replaced or revoked
            # is refused: replayed, it would bring back a key the disk no longer opens with.
            seen = tx.one(
                "SELECT key_id, state FROM disk_keys WHERE device_id = ? AND sealed = ?",
                m.device_id,
                m.sealed,
            )
            if seen is not None and seen["state"] == "active":
                return {"status": "escrowed", "key_id": seen["key_id"], "replaced": []}
            if seen is not None:
                raise Conflict(
                    f"this escrow is key {seen['key_id']}, {seen['state']} since: a replay is refused; "
                    "escrow a new key (recovery-agent escrow)"
                )
            replaced = [
                r["key_id"]
                for r in tx.all(
                    "SELECT key_id FROM disk_keys WHERE device_id = ? AND state = 'active'", m.device_id
                )
            ]
            tx.execute(
                "UPDATE disk_keys SET state = 'rotated', ended_at = ?, ended_by = ? "
                "WHERE device_id = ? AND state = 'active'",
                now,
                m.device_id,
                m.device_id,
            )
            tx.execute(
                "INSERT INTO disk_keys(key_id, device_id, slot, sealed, escrow_key, tpm_sealed, created_at) "
                "VALUES (?,?,?,?,?,?,?)",
                key_id,
                m.device_id,
                m.slot,
                m.sealed,
                m.escrow_key,
                1 if m.tpm_sealed else 0,
                now,
            )
            audit.record(
                tx,
                now,
                "disk_key.escrowed",
                m.device_id,
                m.device_id,
                key_id,
                {"slot": m.slot, "tpm_sealed": m.tpm_sealed, "replaced": replaced},
            )
        self._devices.limits.spend(m.device_id, "KeyEscrow")
        return {"status": "escrowed", "key_id": key_id, "replaced": replaced}

    def request(self, raw: bytes) -> KeyAnswer:
        """A recovery environment's request for its disk key: released, pending a person, or
        refused (Forbidden or Conflict, naming why; audited like a release)."""
        escrow = self._escrow_key()
        v = self._devices.open_message(raw, KeyRequest)  # enrolled, not revoked, its own name
        m = v.message
        now_dt = self._now()
        now = iso(now_dt)
        refusal: ServerError | None = None
        answer: KeyAnswer | None = None
        with self._store.tx() as tx:
            self._challenges.spend(tx, m.device_id, m.server_nonce)  # no replay
            key = tx.one("SELECT * FROM disk_keys WHERE device_id = ? AND state = 'active'", m.device_id)
            why = self._refusal(tx, m, key, now_dt)
            if why is not None:
                refusal = why
                audit.record(
                    tx, now, "disk_key.refused", "server", m.device_id, m.report_id, {"why": str(why)}
                )
            else:
                assert key is not None, "no key is a refusal"
                answer = self._answer(tx, escrow, v.payload_sha256, m, key, now)
        self._devices.limits.spend(m.device_id, "KeyRequest")
        if refusal is not None:
            raise refusal
        assert answer is not None
        return answer

    def _refusal(self, tx: Tx, m: KeyRequest, key: Row | None, now: datetime) -> ServerError | None:
        if self.policy.mode != "on":
            return Forbidden(
                "disk key release is off on this server (recovery-server serve --key-release on): "
                "a person unlocks this machine"
            )
        if key is None:
            return NotFound(
                f"device {m.device_id} has no escrowed disk key (never escrowed, or revoked): a person "
                "unlocks this machine, then `recovery-agent escrow` escrows a new one"
            )
        report = tx.one("SELECT device_id, received_at FROM reports WHERE report_id = ?", m.report_id)
        if report is None:
            # A recovery test an operator asked for (recoverytests.py) is a recovery visit too:
            # its key is released as for a crash, so the path is tested before it is needed.
            # A test the device armed itself is not: it has no failed boot, and nobody asked.
            report = tx.one(
                "SELECT device_id, visited_at AS received_at FROM recovery_tests "
                "WHERE test_id = ? AND requested_by <> ?",
                m.report_id,
                LOCAL_TEST,
            )
        if report is None or report["device_id"] != m.device_id:
            return Forbidden(
                f"report {m.report_id} is not a failed-boot report of device {m.device_id} (nor a recovery "
                "test the server asked for): a disk key is released only in a recovery visit, after its "
                "diagnostics"
            )
        if now - parse_iso(report["received_at"]) > self.policy.window:
            return Forbidden(
                f"report {m.report_id} was received at {report['received_at']}, longer ago than this "
                f"recovery visit may last ({self.policy.window}): report again"
            )
        since = iso(now - timedelta(days=1))
        released = tx.scalar(
            "SELECT count(*) FROM events WHERE kind = 'disk_key.released' AND device_id = ? AND at > ?",
            m.device_id,
            since,
        )
        if released >= self.policy.max_per_day:
            return Forbidden(
                f"device {m.device_id} had its disk key released {released} times in the last day, "
                f"the most the policy allows ({self.policy.max_per_day}): a person looks at it"
            )
        rel = tx.one(
            "SELECT state FROM key_releases WHERE device_id = ? AND report_id = ?", m.device_id, m.report_id
        )
        if rel is not None and rel["state"] == "refused":
            return Forbidden(f"a person refused to release the disk key for report {m.report_id}")
        return None

    def _answer(
        self, tx: Tx, escrow: EscrowKeyFile, request_sha: str, m: KeyRequest, key: Row, now: str
    ) -> KeyAnswer:
        rel = tx.one(
            "SELECT * FROM key_releases WHERE device_id = ? AND report_id = ?", m.device_id, m.report_id
        )
        if rel is None:
            release_id = new_id("rel")
            auto = bool(key["tpm_sealed"])
            tx.execute(
                "INSERT INTO key_releases(release_id, device_id, key_id, report_id, state, requested_at, "
                "decided_at, decided_by) VALUES (?,?,?,?,?,?,?,?)",
                release_id,
                m.device_id,
                key["key_id"],
                m.report_id,
                "approved" if auto else "pending",
                now,
                now if auto else None,
                "policy: TPM-sealed device key" if auto else None,
            )
            audit.record(
                tx,
                now,
                "disk_key.requested",
                m.device_id,
                m.device_id,
                release_id,
                {"report": m.report_id, "key": key["key_id"], "automatic": auto},
            )
            state = "approved" if auto else "pending"
        else:
            release_id, state = rel["release_id"], rel["state"]
        if state == "pending":
            return KeyAnswer(status="pending", release_id=release_id)
        secret = escrow.open(key["sealed"], escrow_context(m.device_id, key["slot"]))
        try:
            sealed = sealing.seal(
                sealing.public_from_b64(m.ephemeral_key), secret, release_context(m.device_id, request_sha)
            )
        finally:
            sealing.wipe(secret)
        message = KeyRelease(
            device_id=m.device_id,
            request_sha256=request_sha,
            key_id=key["key_id"],
            slot=key["slot"],
            sealed=sealed,
            issued_at=self._now(),
        )
        tx.execute(
            "UPDATE key_releases SET state = 'released', released = released + 1, last_released_at = ? "
            "WHERE release_id = ?",
            now,
            release_id,
        )
        audit.record(
            tx,
            now,
            "disk_key.released",
            "server",
            m.device_id,
            release_id,
            {"report": m.report_id, "key": key["key_id"]},
        )
        return KeyAnswer(
            status="released", release_id=release_id, envelope=envelope.seal(message, self._server_key)
        )

    # ---------------------------------------------------------------- people

    def decide(self, user: User, release_id: str, approve: bool) -> DiskKeysView:
        """A person approves (or refuses) a pending release; the device's next request gets it."""
        require(user, Operation.RELEASE_DISK_KEY)
        now = iso(self._now())
        with self._store.tx() as tx:
            rel = tx.one("SELECT * FROM key_releases WHERE release_id = ?", release_id)
            if rel is None:
                raise NotFound(f"no key release {release_id}: see recovery-admin device keys DEVICE")
            if rel["state"] != "pending":
                raise Conflict(f"release {release_id} is {rel['state']}, not waiting for a person")
            tx.execute(
                "UPDATE key_releases SET state = ?, decided_at = ?, decided_by = ? WHERE release_id = ?",
                "approved" if approve else "refused",
                now,
                user.name,
                release_id,
            )
            audit.record(
                tx,
                now,
                "disk_key.release_approved" if approve else "disk_key.release_refused",
                user.name,
                rel["device_id"],
                release_id,
                {"report": rel["report_id"]},
            )
        return self.view(user, rel["device_id"])

    def revoke(self, user: User, device_id: str) -> DiskKeysView:
        """End the device's escrowed keys: nothing is released from them again."""
        require(user, Operation.RELEASE_DISK_KEY)
        now = iso(self._now())
        with self._store.tx() as tx:
            ended = [
                r["key_id"]
                for r in tx.all(
                    "SELECT key_id FROM disk_keys WHERE device_id = ? AND state = 'active'", device_id
                )
            ]
            if not ended:
                raise Conflict(f"device {device_id} has no escrowed key to revoke")
            tx.execute(
                "UPDATE disk_keys SET state = 'revoked', ended_at = ?, ended_by = ? "
                "WHERE device_id = ? AND state = 'active'",
                now,
                user.name,
                device_id,
            )
            audit.record(tx, now, "disk_key.revoked", user.name, device_id, detail={"keys": ended})
        return self.view(user, device_id)

    def view(self, user: User, device_id: str) -> DiskKeysView:
        require(user, Operation.READ_FLEET)
        if self._store.one("SELECT 1 FROM devices WHERE device_id = ?", device_id) is None:
            raise NotFound(f"no device {device_id}: list them with recovery-admin devices")
        keys = [
            {k: r[k] for k in ("key_id", "slot", "state", "created_at", "ended_at", "ended_by")}
            | {"tpm_sealed": bool(r["tpm_sealed"])}
            for r in self._store.all(
                "SELECT * FROM disk_keys WHERE device_id = ? ORDER BY created_at, key_id", device_id
            )
        ]
        releases = [
            dict(r)
            for r in self._store.all(
                "SELECT release_id, key_id, report_id, state, requested_at, decided_at, decided_by, "
                "released, last_released_at FROM key_releases WHERE device_id = ? "
                "ORDER BY requested_at, release_id",
                device_id,
            )
        ]
        return DiskKeysView.model_validate(
            {"device_id": device_id, "policy": self.policy.mode, "keys": keys, "releases": releases}
        )
