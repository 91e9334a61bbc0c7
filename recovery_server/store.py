"""The recovery server's durable state: SQLite (a file under the data directory, the default)
or PostgreSQL (several server processes behind a load balancer share one database).

Every state change is one transaction, so a server killed at any point restarts with either
the whole change or none of it. Writers are serialised: SQLite's ``BEGIN IMMEDIATE``, and on
PostgreSQL a transaction-scoped advisory lock taken first thing, so two server processes can
never both serve a device or both promote a wave. The schema carries a version (table
``schema_meta``); ``migrate`` brings an older database up to date and refuses a newer one.

SQL is written once, with ``?`` placeholders and portable types; the PostgreSQL connection
translates the placeholders.

Tables: users (admins with roles and token hashes), enrollment_tokens (hashes, expiry, uses,
revocation), devices (keys, when and with which token enrolled, revocation), nonces
(spent challenges, until they expire: ``challenges.py``), reports (diagnostics: the signed
payload once, with the signature that verified it), incidents (reports clustered by crash
signature), remediations and approvals, directives (signed, per device and report), results,
health (good boots), events (the audit log, hash-chained: ``audit.py`` writes and checks it).
``retention.py`` deletes old reports, spent nonces and health reports; never events.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from .errors import ServerError

SCHEMA_VERSION = 6


def _store_reports_once(tx: Tx, dialect: str) -> None:
    """Version 3: a report kept its payload twice, as text and inside its envelope (1.5 MB per
    large report). Keep the payload and the envelope's signatures, which rebuild an envelope
    that verifies; index what retention deletes by; and let PostgreSQL hold any whole number
    a device can send in recovery_attempts (SQLite's INTEGER already does)."""
    tx.execute("ALTER TABLE reports ADD COLUMN signatures TEXT NOT NULL DEFAULT '[]'")
    if dialect == "sqlite":
        tx.execute("UPDATE reports SET signatures = coalesce(json_extract(envelope, '$.signatures'), '[]')")
    else:
        tx.execute("UPDATE reports SET signatures = coalesce((envelope::json -> 'signatures')::text, '[]')")
        tx.execute("ALTER TABLE devices ALTER COLUMN recovery_attempts TYPE BIGINT")
    tx.execute("ALTER TABLE reports DROP COLUMN envelope")
    tx.execute("CREATE INDEX reports_received ON reports(received_at)")
    tx.execute("CREATE INDEX nonces_expires ON nonces(expires_at)")
    tx.execute("CREATE INDEX health_received ON health(received_at)")


# Each version's changes over the one before, applied in order in one transaction: SQL for
# both databases, or a function of the transaction and the dialect. _SCHEMA is version 1.
# Never edit a released step: add the next one.
_MIGRATIONS: dict[int, list[str | Callable[[Tx, str], None]]] = {
    2: [  # approvers' own keys and signed approvals
        "ALTER TABLE users ADD COLUMN public_key TEXT",
        "ALTER TABLE approvals ADD COLUMN envelope TEXT",
    ],
    3: [  # each report stored once; enrollment that cannot steer a rollout (devices.py, rollout.py)
        _store_reports_once,
        # Enrollment tokens get a public id (from their hash, so old tokens have one too), a
        # use limit and revocation. Tokens that never expired end with this upgrade: an old
        # fleet token left in a script or an image must not enroll devices for ever.
        "ALTER TABLE enrollment_tokens ADD COLUMN token_id TEXT",
        "UPDATE enrollment_tokens SET token_id = 'et-' || substr(token_sha256, 1, 12)",
        "CREATE UNIQUE INDEX enrollment_tokens_id ON enrollment_tokens(token_id)",
        "ALTER TABLE enrollment_tokens ADD COLUMN max_uses INTEGER",
        "ALTER TABLE enrollment_tokens ADD COLUMN used INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE enrollment_tokens ADD COLUMN revoked_at TEXT",
        "ALTER TABLE enrollment_tokens ADD COLUMN revoked_by TEXT",
        "UPDATE enrollment_tokens SET expires_at = created_at WHERE expires_at IS NULL",
        # Devices: when their key was enrolled (the audit log's sequence number of that entry),
        # with which token, and whether an admin revoked them.
        "ALTER TABLE devices ADD COLUMN enrolled_seq BIGINT NOT NULL DEFAULT 0",
        "UPDATE devices SET enrolled_seq = coalesce((SELECT max(seq) FROM events "
        "WHERE kind = 'device.enrolled' AND events.device_id = devices.device_id), 0)",
        "ALTER TABLE devices ADD COLUMN enrolled_with TEXT",
        "ALTER TABLE devices ADD COLUMN revoked_at TEXT",
        "ALTER TABLE devices ADD COLUMN revoked_by TEXT",
        # Rollouts: when they started, in the same order; directives: whether their outcome
        # moves the gate (the device's first, if its key was enrolled before the rollout).
        "ALTER TABLE rollouts ADD COLUMN started_seq BIGINT NOT NULL DEFAULT 0",
        "UPDATE rollouts SET started_seq = coalesce((SELECT min(seq) FROM events "
        "WHERE kind = 'rollout.created' AND events.subject = rollouts.rollout_id), "
        "(SELECT coalesce(max(seq), 0) + 1 FROM events))",
        "ALTER TABLE directives ADD COLUMN counted INTEGER NOT NULL DEFAULT 0",
        "DROP INDEX directives_rollout",
        "CREATE INDEX directives_gate ON directives(remediation_id, wave, counted, outcome)",
        "UPDATE directives SET counted = 1 WHERE directive_id IN (SELECT directive_id FROM "
        "(SELECT directive_id, row_number() OVER (PARTITION BY device_id, remediation_id "
        "ORDER BY issued_at, directive_id) AS n FROM directives) AS served WHERE n = 1) "
        "AND (SELECT enrolled_seq FROM devices WHERE devices.device_id = directives.device_id) "
        "< (SELECT started_seq FROM rollouts WHERE rollouts.remediation_id = directives.remediation_id)",
    ],
    4: [  # the fleet's inventory (fleetfiles.py): each file's content once, what each device runs
        "CREATE TABLE file_contents (path TEXT NOT NULL, sha256 TEXT NOT NULL, size BIGINT NOT NULL, "
        "version TEXT, first_seen_at TEXT NOT NULL, first_seen_by TEXT NOT NULL, PRIMARY KEY (path, sha256))",
        "CREATE TABLE device_files (device_id TEXT NOT NULL REFERENCES devices(device_id), "
        "path TEXT NOT NULL, sha256 TEXT NOT NULL, mtime DOUBLE PRECISION NOT NULL, "
        "PRIMARY KEY (device_id, path))",
        "CREATE INDEX device_files_content ON device_files(path, sha256)",
        "ALTER TABLE devices ADD COLUMN inventory_digest TEXT",
        "ALTER TABLE devices ADD COLUMN inventory_at TEXT",
    ],
    5: [  # known-bad rules (rules.py), approved M of N; the remediations made from them
        "CREATE TABLE known_bad_rules (rule_id TEXT PRIMARY KEY, title TEXT NOT NULL, "
        "path_pattern TEXT NOT NULL, sha256 TEXT NOT NULL, author TEXT NOT NULL REFERENCES users(name), "
        "required_approvals INTEGER NOT NULL, plan TEXT, status TEXT NOT NULL DEFAULT 'pending', "
        "created_at TEXT NOT NULL, revoked_at TEXT, revoked_by TEXT)",
        "CREATE TABLE rule_approvals (rule_id TEXT NOT NULL REFERENCES known_bad_rules(rule_id), "
        "approver TEXT NOT NULL REFERENCES users(name), approved_at TEXT NOT NULL, envelope TEXT, "
        "PRIMARY KEY (rule_id, approver))",
        "ALTER TABLE remediations ADD COLUMN rule_id TEXT",
        # encrypted disks (diskkeys.py): escrowed recovery keys, sealed to the escrow key (whose
        # private half is a file of its own, never here), and their releases
        "CREATE TABLE disk_keys (key_id TEXT PRIMARY KEY, "
        "device_id TEXT NOT NULL REFERENCES devices(device_id), slot INTEGER NOT NULL, "
        "sealed TEXT NOT NULL, escrow_key TEXT NOT NULL, tpm_sealed INTEGER NOT NULL DEFAULT 0, "
        "state TEXT NOT NULL DEFAULT 'active', created_at TEXT NOT NULL, ended_at TEXT, ended_by TEXT)",
        "CREATE INDEX disk_keys_device ON disk_keys(device_id, state)",
        "CREATE TABLE key_releases (release_id TEXT PRIMARY KEY, "
        "device_id TEXT NOT NULL REFERENCES devices(device_id), "
        "key_id TEXT NOT NULL REFERENCES disk_keys(key_id), "
        "report_id TEXT NOT NULL, state TEXT NOT NULL, requested_at TEXT NOT NULL, decided_at TEXT, "
        "decided_by TEXT, released INTEGER NOT NULL DEFAULT 0, last_released_at TEXT, "
        "UNIQUE (device_id, report_id))",
        # test mode (recoverytests.py): a device's recovery path tested on purpose
        "CREATE TABLE recovery_tests (test_id TEXT PRIMARY KEY, "
        "device_id TEXT NOT NULL REFERENCES devices(device_id), "
        "requested_by TEXT NOT NULL, visited_at TEXT NOT NULL, diagnostics_sha256 TEXT NOT NULL UNIQUE, "
        "poll_token_sha256 TEXT NOT NULL, payload TEXT NOT NULL, envelope TEXT NOT NULL, "
        "expires_at TEXT NOT NULL, outcome TEXT NOT NULL DEFAULT 'issued', applied_at TEXT, "
        "passed_at TEXT, detail TEXT NOT NULL DEFAULT '')",
        "CREATE INDEX recovery_tests_device ON recovery_tests(device_id, visited_at)",
        "ALTER TABLE devices ADD COLUMN recovery_test_requested_at TEXT",
        "ALTER TABLE devices ADD COLUMN recovery_test_requested_by TEXT",
        "ALTER TABLE devices ADD COLUMN recovery_test_passed_at TEXT",
    ],
    6: [  # an incident's reports read a page at a time, and its devices counted, from an index
        # (fleet-sized incidents: incidents.py); the first column serves what reports_incident did
        "CREATE INDEX reports_incident_time ON reports(incident_id, received_at, report_id)",
        "CREATE INDEX reports_incident_device ON reports(incident_id, device_id)",
        "DROP INDEX reports_incident",
    ],
}

_SCHEMA = """
CREATE TABLE schema_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
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
CREATE TABLE rollouts (
    rollout_id TEXT PRIMARY KEY,
    remediation_id TEXT NOT NULL UNIQUE REFERENCES remediations(remediation_id),
    plan TEXT NOT NULL,
    state TEXT NOT NULL,
    current_wave INTEGER NOT NULL DEFAULT 0,
    wave_started_at TEXT NOT NULL,
    halt_overridden INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    created_by TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE directives (
    directive_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices(device_id),
    report_id TEXT NOT NULL UNIQUE REFERENCES reports(report_id),
    remediation_id TEXT NOT NULL REFERENCES remediations(remediation_id),
    issued_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    envelope TEXT NOT NULL,
    wave INTEGER,
    outcome TEXT NOT NULL DEFAULT 'pending',
    outcome_at TEXT
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
    seq BIGINT PRIMARY KEY,
    at TEXT NOT NULL,
    kind TEXT NOT NULL,
    actor TEXT NOT NULL,
    device_id TEXT,
    subject TEXT,
    detail TEXT NOT NULL DEFAULT '',
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX reports_incident ON reports(incident_id);
CREATE INDEX reports_device ON reports(device_id);
CREATE INDEX events_device ON events(device_id);
CREATE INDEX directives_rollout ON directives(remediation_id, wave, outcome);
CREATE INDEX directives_device ON directives(device_id, outcome);
"""


class StoreError(ServerError):
    """Raised when the database cannot be used as it is (newer schema, not a database, a
    missing driver, a PostgreSQL server that refused the login or has no such database)."""


class StoreUnreachable(StoreError):
    """Raised when no PostgreSQL server answered at the URL's host and port."""


class Row(Protocol):
    """A result row, by column name or by position (``sqlite3.Row``, or ``_PgRow`` below)."""

    def __getitem__(self, key: str | int, /) -> Any: ...

    def keys(self) -> list[str]: ...


class Reader(Protocol):
    """What reads the store: the store itself (outside a transaction) or a transaction."""

    def one(self, sql: str, *args: Any) -> Row | None: ...

    def all(self, sql: str, *args: Any) -> list[Row]: ...

    def scalar(self, sql: str, *args: Any) -> Any: ...


_WRITE_LOCK_KEY = 0x514D52  # "QMR": the advisory lock every PostgreSQL writer takes first


class Store:
    """A thread-safe handle on the database; one per server process.

    ``Store(path)`` opens SQLite; ``Store("postgresql://...")`` opens PostgreSQL.

    Two connections: one for write transactions (``tx``), one for the reads made outside a
    transaction (``one``, ``all``, ``scalar``). A read never waits for a writer, so the event
    loop's reads (a long poll's look, a device's key) go on while a batch of reports commits
    in its thread (``groupcommit.py``). A read made by the thread that holds a transaction
    open goes to that transaction's connection, so it sees what the transaction wrote.
    """

    def __init__(self, location: str | Path) -> None:
        # Write transactions begun, and the time spent waiting for the write lock (this
        # process's other writers, and other processes': SQLite's lock, PostgreSQL's advisory
        # lock), for /metrics.
        self.transactions = 0
        # What this process learnt of the database and keeps across transactions, by name
        # (fleetfiles.py: file contents known to be stored). Only what a commit made true.
        self.memo: dict[str, Any] = {}
        self.write_lock_wait_s = 0.0
        self._lock = threading.RLock()
        self._read_lock = threading.Lock()
        self._in_tx = threading.local()
        text = str(location)
        self._db: _Connection
        self._read_db: _Connection
        if text.startswith(("postgresql://", "postgres://")):
            self.dialect = "postgresql"
            self.url = text
            self._db = _connect_postgres(text)
            self.migrate()
            self._read_db = _connect_postgres(text)
        else:
            self.dialect = "sqlite"
            path = Path(text.removeprefix("sqlite:///"))
            self.url = f"sqlite:///{path}"
            self._db = _connect_sqlite(path)
            self.migrate()
            self._read_db = _connect_sqlite(path)

    def migrate(self) -> None:
        with self.tx() as db:
            has_meta = db.one(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_meta'"
                if self.dialect == "sqlite"
                else "SELECT 1 FROM information_schema.tables WHERE table_name = 'schema_meta' "
                "AND table_schema = current_schema()"
            )
            version = 0
            if has_meta:
                row = db.one("SELECT value FROM schema_meta WHERE key = 'version'")
                version = int(row["value"]) if row else 0
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.url} has schema version {version}, newer than this server's "
                    f"{SCHEMA_VERSION}: upgrade the server, do not downgrade a database"
                )
            if version == 0:
                db.executescript_in_tx(_SCHEMA)
                db.execute("INSERT INTO schema_meta VALUES ('version', '1')")
                version = 1
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step]:
                    if isinstance(statement, str):
                        db.execute(statement)
                    else:
                        statement(db, self.dialect)
                db.execute("UPDATE schema_meta SET value = ? WHERE key = 'version'", str(step))

    @contextmanager
    def tx(self) -> Iterator[Tx]:
        """One write transaction; writers queue up instead of failing."""
        asked = time.perf_counter()
        with self._lock:
            if self.dialect == "sqlite":
                self._db.execute("BEGIN IMMEDIATE")
            else:
                self._db.execute("BEGIN")
                self._db.execute("SELECT pg_advisory_xact_lock(?)", (_WRITE_LOCK_KEY,))
            self.transactions += 1
            self.write_lock_wait_s += time.perf_counter() - asked
            self._in_tx.open = True
            try:
                tx = Tx(self._db, self.dialect, self.memo)
                yield tx
                tx.settle_all()
                for finish in list(tx.before_commit.values()):
                    finish(tx)
                self._db.execute("COMMIT")
                for done in tx.after_commit:
                    done()
            except BaseException:
                # Also when COMMIT itself failed (a full disk): the connection must not stay
                # inside the failed transaction, or every later BEGIN would fail too.
                with contextlib.suppress(Exception):
                    self._db.execute("ROLLBACK")
                raise
            finally:
                self._in_tx.open = False

    @contextmanager
    def _reading(self) -> Iterator[Tx]:
        if getattr(self._in_tx, "open", False):  # this thread's own open transaction
            with self._lock:
                yield Tx(self._db, self.dialect)
        else:
            with self._read_lock:
                yield Tx(self._read_db, self.dialect)

    @contextmanager
    def reading_apart(self) -> Iterator[Tx]:
        """A connection of its own, for a long read (correlation.py: seconds over a fleet of
        100,000), so the other reads do not queue behind it on the shared one; in one read
        transaction (one snapshot of what was committed), rolled back and closed after."""
        if self.dialect == "postgresql":
            db: _Connection = _connect_postgres(self.url)
            db.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        else:
            db = _connect_sqlite(Path(self.url.removeprefix("sqlite:///")))
            db.execute("BEGIN")
        try:
            yield Tx(db, self.dialect)
        finally:
            with contextlib.suppress(Exception):
                db.execute("ROLLBACK")
            db.close()

    def one(self, sql: str, *args: Any) -> Row | None:
        with self._reading() as db:
            return db.one(sql, *args)

    def all(self, sql: str, *args: Any) -> list[Row]:
        with self._reading() as db:
            return db.all(sql, *args)

    def scalar(self, sql: str, *args: Any) -> Any:
        with self._reading() as db:
            return db.scalar(sql, *args)

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._read_db.close()
            self._db.close()


class _Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class _Connection(Protocol):
    """What the store needs of a connection: sqlite3's, or ``_PgConnection`` below."""

    def execute(self, sql: str, args: tuple[Any, ...] = ..., /) -> _Cursor: ...

    def executemany(self, sql: str, rows: Iterable[tuple[Any, ...]], /) -> Any: ...

    def close(self) -> None: ...


def _connect_sqlite(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA busy_timeout=5000")
    except sqlite3.DatabaseError as exc:
        raise StoreError(
            f"{path} is not a usable SQLite database ({exc}): point --data at the server's data directory"
        ) from None
    return db


class _PgRow(tuple[Any, ...]):
    """A row that answers by position and by column name, like sqlite3.Row."""

    _names: tuple[str, ...] = ()

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            try:
                return tuple.__getitem__(self, self._names.index(key))
            except ValueError:
                raise IndexError(f"no column {key!r}") from None
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


def _pg_rows(cursor: Any) -> Callable[[Any], _PgRow]:
    return _row_class(tuple(d.name for d in cursor.description or ()))


@functools.lru_cache(maxsize=512)
def _row_class(names: tuple[str, ...]) -> type[_PgRow]:
    """One row class per set of column names (the queries are few), not one per query."""
    return type("Row", (_PgRow,), {"_names": names})


def _connect_postgres(url: str) -> _PgConnection:
    try:
        import psycopg
    except ImportError:
        raise StoreError(
            "PostgreSQL needs the psycopg package: pip install 'psycopg[binary]' "
            "(or install the project with its [postgres] extra)"
        ) from None
    try:
        db = psycopg.connect(url, autocommit=True, row_factory=_pg_rows)
    except psycopg.Error as exc:
        # No SQLSTATE: no server answered. With one, a server answered and refused (login, database).
        error = StoreUnreachable if exc.sqlstate is None else StoreError
        raise error(f"cannot connect to PostgreSQL at {_redact(url)}: {exc}".strip()) from None
    return _PgConnection(db)


def _redact(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


@functools.lru_cache(maxsize=1024)
def _pg_sql(sql: str) -> str:
    """The store's SQL (``?`` placeholders) as psycopg takes it, translated once per statement."""
    return sql.replace("?", "%s")


class _PgConnection:
    """psycopg with the sqlite3 calling convention the store uses: ``?`` placeholders."""

    def __init__(self, db: Any) -> None:
        self._db = db

    def execute(self, sql: str, args: tuple[Any, ...] = (), /) -> _Cursor:
        cursor: _Cursor = self._db.execute(_pg_sql(sql), args)
        return cursor

    def executemany(self, sql: str, rows: Iterable[tuple[Any, ...]], /) -> Any:
        with self._db.cursor() as cursor:
            cursor.executemany(_pg_sql(sql), rows)

    def close(self) -> None:
        self._db.close()


def storable(value: Any) -> Any:
    """``value`` as the store keeps it: text with each NUL character replaced by U+FFFD.

    PostgreSQL cannot hold NUL in text, and a kernel log (a crash title, a hostname) may carry
    one; both databases keep the same replacement, so a row reads back the same on either and
    a hash over it (the audit log's) is computed over what is stored."""
    return value.replace("\x00", "\ufffd") if isinstance(value, str) and "\x00" in value else value


class Tx:
    """The connection inside a transaction, with the same query helpers as the store.

    ``cache`` holds what a transaction's writers keep between statements (audit.py: the log's
    head); a rollback to a savepoint drops it. ``settle`` holds work that many writes may ask
    for and that is done once, by name, before the transaction ends or when a later statement
    needs its effect (:meth:`settle_now`; rollout.py: re-judging a rollout after a batch of
    outcomes, where judging after each would re-count its wave each time). ``before_commit``
    holds what they write once, as the last statements of the transaction, by name (audit.py:
    the head kept apart). ``memo`` is the store's, kept across transactions, and
    ``after_commit`` what is run once the transaction committed (fleetfiles.py: remembering
    what it stored, which a rolled-back transaction must not make it believe)."""

    def __init__(self, db: _Connection, dialect: str = "sqlite", memo: dict[str, Any] | None = None) -> None:
        self._db = db
        self.dialect = dialect
        self.memo: dict[str, Any] = {} if memo is None else memo
        self.after_commit: list[Callable[[], None]] = []
        self.cache: dict[str, Any] = {}
        self.settle: dict[str, Callable[[Tx], None]] = {}
        self.before_commit: dict[str, Callable[[Tx], None]] = {}

    def settle_now(self, name: str) -> None:
        """Do the settle work ``name`` now, if some write asked for it."""
        work = self.settle.pop(name, None)
        if work is not None:
            work(self)

    def settle_all(self) -> None:
        """Do every settle work asked for (work may ask for more: it is done too)."""
        while self.settle:
            self.settle_now(next(iter(self.settle)))

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A part of the transaction that fails alone: on an exception it is rolled back, and
        the exception goes on (groupcommit.py runs each write in one)."""
        self._db.execute("SAVEPOINT one_write")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK TO SAVEPOINT one_write")
            self._db.execute("RELEASE SAVEPOINT one_write")
            self.cache.clear()
            raise
        self._db.execute("RELEASE SAVEPOINT one_write")

    def execute(self, sql: str, *args: Any) -> _Cursor:
        return self._db.execute(sql, tuple(storable(a) for a in args))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """One statement for many rows (sqlite3's and psycopg's batching)."""
        self._db.executemany(sql, [tuple(storable(a) for a in row) for row in rows])

    def executescript_in_tx(self, script: str) -> None:
        # sqlite3's executescript() would COMMIT first; run the statements one by one instead.
        for statement in script.split(";"):
            if statement.strip():
                self.execute(statement)

    def one(self, sql: str, *args: Any) -> Row | None:
        row: Row | None = self.execute(sql, *args).fetchone()
        return row

    def all(self, sql: str, *args: Any) -> list[Row]:
        return self.execute(sql, *args).fetchall()

    def scalar(self, sql: str, *args: Any) -> Any:
        """The first column of the first row (a count, one value), or None."""
        row = self.one(sql, *args)
        return None if row is None else row[0]


# ---------------------------------------------------------------- how rows spell values


def iso(t: datetime) -> str:
    """A time as the store keeps it: UTC, to the second, ``2026-01-01T00:00:00Z``."""
    return t.astimezone(UTC).replace(microsecond=0, tzinfo=None).isoformat() + "Z"


def parse_iso(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def token_sha256(token: str) -> str:
    """Tokens (people's, enrollment, poll) are kept only as their sha256."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_id(prefix: str) -> str:
    """A fresh row id such as ``rem-1a2b3c4d5e6f``."""
    return f"{prefix}-{secrets.token_hex(6)}"
