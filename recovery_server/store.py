"""The recovery server's durable state, in SQLite (a file under the data directory).

Every state change is one transaction, so a server killed at any point restarts with either
the whole change or none of it. The schema carries a version (``PRAGMA user_version``);
``migrate`` brings an older file up to date and refuses a newer one.

Tables: users (admins with roles and token hashes), enrollment_tokens, devices, nonces
(server challenges, each usable once), reports (diagnostics), incidents (reports clustered by
crash signature), remediations and approvals, directives (signed, per device and report),
results, health (good boots), events (the timeline of everything that happened).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    token_sha256 TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
CREATE TABLE enrollment_tokens (
    token_sha256 TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT
);
CREATE TABLE devices (
    device_id TEXT PRIMARY KEY,
    public_key TEXT NOT NULL,
    key_id TEXT NOT NULL UNIQUE,
    hostname TEXT NOT NULL DEFAULT '',
    enrolled_at TEXT NOT NULL,
    last_seen TEXT,
    state TEXT NOT NULL DEFAULT 'healthy',
    recovery_attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE nonces (
    nonce TEXT PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices(device_id),
    issued_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    used_at TEXT
);
CREATE TABLE incidents (
    incident_id TEXT PRIMARY KEY,
    signature_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    title TEXT NOT NULL,
    guilty_module TEXT,
    guilty_frame TEXT,
    channel_file TEXT,
    first_seen TEXT NOT NULL,
    last_seen TEXT NOT NULL,
    report_count INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE reports (
    report_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices(device_id),
    incident_id TEXT NOT NULL REFERENCES incidents(incident_id),
    diagnostics_sha256 TEXT NOT NULL UNIQUE,
    agent_nonce TEXT NOT NULL,
    poll_token_sha256 TEXT NOT NULL,
    received_at TEXT NOT NULL,
    payload TEXT NOT NULL,
    envelope TEXT NOT NULL
);
CREATE TABLE remediations (
    remediation_id TEXT PRIMARY KEY,
    incident_id TEXT REFERENCES incidents(incident_id),
    title TEXT NOT NULL,
    actions TEXT NOT NULL,
    author TEXT NOT NULL REFERENCES users(name),
    required_approvals INTEGER NOT NULL DEFAULT 1,
    status TEXT NOT NULL DEFAULT 'pending',
    created_at TEXT NOT NULL
);
CREATE TABLE approvals (
    remediation_id TEXT NOT NULL REFERENCES remediations(remediation_id),
    approver TEXT NOT NULL REFERENCES users(name),
    approved_at TEXT NOT NULL,
    PRIMARY KEY (remediation_id, approver)
);
CREATE TABLE directives (
    directive_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices(device_id),
    report_id TEXT NOT NULL UNIQUE REFERENCES reports(report_id),
    remediation_id TEXT NOT NULL REFERENCES remediations(remediation_id),
    issued_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    envelope TEXT NOT NULL
);
CREATE TABLE results (
    directive_id TEXT PRIMARY KEY REFERENCES directives(directive_id),
    device_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    received_at TEXT NOT NULL,
    payload TEXT NOT NULL
);
CREATE TABLE health (
    device_id TEXT NOT NULL REFERENCES devices(device_id),
    boot_id TEXT NOT NULL,
    directive_id TEXT,
    received_at TEXT NOT NULL,
    PRIMARY KEY (device_id, boot_id)
);
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    kind TEXT NOT NULL,
    actor TEXT NOT NULL,
    device_id TEXT,
    subject TEXT,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX reports_incident ON reports(incident_id);
CREATE INDEX reports_device ON reports(device_id);
CREATE INDEX events_device ON events(device_id);
"""


class StoreError(Exception):
    """Raised when the database file cannot be used as it is (newer schema, not a database)."""


@dataclass
class Store:
    """A thread-safe handle on the SQLite database; one per server process."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a usable SQLite database ({exc}): point "
                             "--data at the server's data directory") from None
        self.migrate()

    def migrate(self) -> None:
        with self.tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has schema version {version}, newer than this server's "
                    f"{SCHEMA_VERSION}: upgrade the server, do not downgrade a database")
            if version == 0:
                db.executescript_in_tx(_SCHEMA)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def tx(self) -> Iterator["_Tx"]:
        """One write transaction (BEGIN IMMEDIATE: writers queue up instead of failing)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield _Tx(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    def one(self, sql: str, *args: Any) -> sqlite3.Row | None:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def all(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _Tx:
    """The connection inside a transaction, with the same query helpers as the store."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        return self._db.execute(sql, args)

    def executescript_in_tx(self, script: str) -> None:
        # executescript() would COMMIT first; run the statements one by one instead.
        for statement in script.split(";"):
            if statement.strip():
                self._db.execute(statement)

    def one(self, sql: str, *args: Any) -> sqlite3.Row | None:
        return self._db.execute(sql, args).fetchone()

    def all(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        return self._db.execute(sql, args).fetchall()

    def event(self, at: str, kind: str, actor: str, device_id: str | None = None,
              subject: str | None = None, detail: Any = "") -> None:
        if not isinstance(detail, str):
            detail = json.dumps(detail, sort_keys=True)
        self._db.execute(
            "INSERT INTO events(at, kind, actor, device_id, subject, detail) VALUES (?,?,?,?,?,?)",
            (at, kind, actor, device_id, subject, detail))
