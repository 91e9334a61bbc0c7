"""People and their tokens: who uses the admin API, and as whom.

A person has a name, a role (``access.py``) and a token, shown once when made and kept only
as its sha256; ``authenticate`` turns a token back into the person. A person may register
their own Ed25519 key: from then on their approvals must be signed with it
(``remediations.py`` checks them), and devices that pin the key check those signatures too.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar

from recovery_agent.protocol import envelope, keys
from recovery_agent.protocol.admin import NewUser, RegisteredKey
from recovery_agent.protocol.envelope import EnvelopeError, Verified
from recovery_agent.protocol.wire import SignedMessage

from . import audit
from .access import ROLES, Operation, User, require
from .errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized
from .store import Store, Tx, iso, token_sha256

M = TypeVar("M", bound=SignedMessage)


class Users:
    def __init__(self, store: Store, now: Callable[[], datetime]) -> None:
        self._store = store
        self._now = now

    def create(self, actor: User, name: str, role: str) -> NewUser:
        """``actor`` adds a person; the answer carries their token, which is not kept and
        cannot be shown again."""
        require(actor, Operation.ADD_USER)
        if role not in ROLES:
            raise BadRequest(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
        if (
            not name
            or len(name) > 64
            or not name.replace("-", "").replace("_", "").replace(".", "").isalnum()
        ):
            raise BadRequest("user name must be 1 to 64 letters, digits, '.', '-' or '_'")
        token = "qmr_" + secrets.token_urlsafe(32)
        now = iso(self._now())
        with self._store.tx() as tx:
            if tx.one("SELECT 1 FROM users WHERE name = ?", name):
                raise Conflict(f"user {name!r} exists already")
            tx.execute(
                "INSERT INTO users(name, role, token_sha256, created_at) VALUES (?,?,?,?)",
                name,
                role,
                token_sha256(token),
                now,
            )
            audit.record(tx, now, "user.created", actor.name, subject=name, detail={"role": role})
        return NewUser.model_validate({"name": name, "role": role, "token": token})

    def has_admin(self) -> bool:
        return self._store.one("SELECT 1 FROM users WHERE role = 'admin'") is not None

    def authenticate(self, token: str | None) -> User:
        if not token:
            raise Unauthorized("no admin token: pass --token or set RECOVERY_TOKEN")
        row = self._store.one("SELECT name, role FROM users WHERE token_sha256 = ?", token_sha256(token))
        if row is None:
            raise Unauthorized(
                "admin token not recognised: ask an admin for a token (recovery-admin user NAME --role ROLE)"
            )
        return User(row["name"], row["role"])

    def register_key(self, user: User, public_key: str) -> RegisteredKey:
        """A person registers their own Ed25519 key; from then on their approvals must be
        signed with it, and devices that pin it can check those signatures themselves."""
        require(user, Operation.REGISTER_OWN_KEY)
        try:
            pub = keys.public_from_b64(public_key)
        except ValueError as exc:
            raise BadRequest(f"public_key: {exc}") from None
        kid = keys.key_id(pub)
        with self._store.tx() as tx:
            row = tx.one("SELECT public_key FROM users WHERE name = ?", user.name)
            if row is None:
                raise NotFound(f"no user {user.name}")
            if row["public_key"] and row["public_key"] != public_key:
                raise Conflict(f"{user.name} has a key already; an admin must replace a person's key")
            tx.execute("UPDATE users SET public_key = ? WHERE name = ?", public_key, user.name)
            audit.record(
                tx,
                iso(self._now()),
                "user.key_registered",
                user.name,
                subject=user.name,
                detail={"key_id": kid},
            )
        return RegisteredKey(name=user.name, key_id=kid)


def signed_approval(
    tx: Tx, user: User, signed: Mapping[str, Any] | None, model: type[M], command: str
) -> Verified[M] | None:
    """A person's signed approval (a ``model`` envelope) verified against the key they
    registered; None for a person with no registered key (who approves unsigned). Refused if
    they have a key and did not sign (``command`` is how to), or sent a signature they have no
    key for, or one that does not verify. What it must cover is the caller's to check."""
    row = tx.one("SELECT public_key FROM users WHERE name = ?", user.name)
    if row is None or not row["public_key"]:
        if signed is not None:
            raise BadRequest(
                f"{user.name} has no registered key to check this signature against: "
                "recovery-admin key create first"
            )
        return None
    if signed is None:
        raise Forbidden(f"{user.name} has a registered key, so approvals must be signed with it: {command}")
    pub = keys.public_from_b64(row["public_key"])
    try:
        verified = envelope.open_envelope(signed, model, {keys.key_id(pub): pub})
    except EnvelopeError as exc:
        raise BadRequest(f"signed approval: {exc}") from None
    if getattr(verified.message, "approver", None) != user.name:
        raise BadRequest(f"signed approval names another person than {user.name}")
    return verified
