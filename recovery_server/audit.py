"""The audit log: every admin and device action, one entry each, hash-chained so that an
edited, removed or reordered entry shows.

How it works:

1. Every writer records its entry with ``record`` inside its own write transaction. Writers
   hold the store's write lock exclusively, so reading the head and appending cannot
   interleave, and the entry commits or rolls back with the change it describes. A
   transaction reads the head once and keeps it (a rollback to a savepoint forgets it).
2. An entry's hash is the sha256 of the previous entry's hash and this entry's fields
   (``entry_hash``); the first entry follows ``GENESIS_HASH``.
3. The head (``SEQ:HASH`` of the last entry) is also kept apart from the chain, in
   ``schema_meta``, written as the transaction's last statement, so entries cut off the end
   show too; a head recorded elsewhere
   (``expect_head``) catches someone who also rewrote that.
4. ``verify_chain`` walks the whole chain and names every problem it finds; the offline
   ``recovery-server audit-verify`` runs it on the database itself, ``AuditLog`` for people
   on the admin API.

The table itself (``events``) is part of the store's schema (``store.py``).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from recovery_agent.protocol.admin import AuditEntry, AuditReport

from .access import Operation, User, require
from .changefeed import notify_on_commit, wakes_polls
from .errors import BadRequest
from .store import Store, Tx, storable

GENESIS_HASH = "0" * 64
_FIELDS = ("seq", "at", "kind", "actor", "device_id", "subject", "detail")


def entry_hash(prev_hash: str, entry: dict[str, Any]) -> str:
    """sha256 over the previous entry's hash and this entry's fields (canonical JSON)."""
    body = json.dumps({k: entry[k] for k in _FIELDS}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{prev_hash}\n{body}".encode()).hexdigest()


def record(
    tx: Tx,
    at: str,
    kind: str,
    actor: str,
    device_id: str | None = None,
    subject: str | None = None,
    detail: Any = "",
) -> int:
    """Append one entry to the log, inside the caller's write transaction; its sequence
    number, which orders it among everything the server did. ``detail`` is text, or anything
    JSON can hold (kept as canonical JSON)."""
    if not isinstance(detail, str):
        detail = json.dumps(detail, sort_keys=True)
    last_seq, prev = _head(tx)
    seq = last_seq + 1
    # Hash what the store will hold (it writes no NUL characters), so the chain verifies.
    entry = {
        "seq": seq,
        "at": at,
        "kind": kind,
        "actor": storable(actor),
        "device_id": storable(device_id),
        "subject": storable(subject),
        "detail": storable(detail),
    }
    digest = entry_hash(prev, entry)
    tx.execute(
        "INSERT INTO events(seq, at, kind, actor, device_id, subject, detail, prev_hash, hash) "
        "VALUES (?,?,?,?,?,?,?,?,?)",
        *entry.values(),
        prev,
        digest,
    )
    # The next entry of this transaction follows this one without asking the database again.
    tx.cache[_HEAD] = (int(seq), digest)
    tx.before_commit[_HEAD] = _keep_head
    if wakes_polls(kind):
        notify_on_commit(tx)
    return int(seq)


_HEAD = "audit_head"


def _head(tx: Tx) -> tuple[int, str]:
    """The last entry's sequence number and hash, as this transaction sees the chain."""
    head: tuple[int, str] | None = tx.cache.get(_HEAD)
    if head is None:
        row = tx.one("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1")
        head = (int(row[0]), str(row[1])) if row else (0, GENESIS_HASH)
    return head


def _keep_head(tx: Tx) -> None:
    """The head also lives apart from the chain, so cutting entries off the end shows: written
    once per transaction, as its last statement, whatever number of entries it appended."""
    seq, digest = _head(tx)
    if seq == 0:
        return  # every entry of the transaction was rolled back, and the log is empty
    updated = tx.execute("UPDATE schema_meta SET value = ? WHERE key = 'audit_head'", f"{seq}:{digest}")
    if updated.rowcount == 0:
        tx.execute("INSERT INTO schema_meta VALUES ('audit_head', ?)", f"{seq}:{digest}")


def verify_chain(store: Store, expect_head: str | None = None) -> AuditReport:
    """Walk the whole chain; report every entry that was edited, removed or reordered, and
    entries cut off the end (against the recorded head, or ``expect_head`` kept elsewhere)."""
    problems: list[str] = []
    prev_seq, prev_hash = 0, GENESIS_HASH
    count = 0
    for row in store.all("SELECT * FROM events ORDER BY seq"):
        count += 1
        entry = {k: row[k] for k in _FIELDS}
        if row["seq"] != prev_seq + 1:
            problems.append(f"entries {prev_seq + 1}..{row['seq'] - 1} are missing (removed)")
        if row["prev_hash"] != prev_hash:
            problems.append(f"entry {row['seq']} does not follow the entry before it in the chain")
        if entry_hash(row["prev_hash"], entry) != row["hash"]:
            problems.append(
                f"entry {row['seq']} ({row['kind']}) was edited: its hash does not match its content"
            )
        prev_seq, prev_hash = row["seq"], row["hash"]
    head = f"{prev_seq}:{prev_hash}" if count else ""
    recorded = store.one("SELECT value FROM schema_meta WHERE key = 'audit_head'")
    for name, want in (("recorded head", recorded[0] if recorded else ""), ("expected head", expect_head)):
        if want and want != head:
            want_seq = int(want.split(":")[0])
            if want_seq > prev_seq:
                problems.append(
                    f"entries {prev_seq + 1}..{want_seq} are missing at the end ({name} {want[:24]}…)"
                )
            else:
                problems.append(f"the chain does not end where the {name} says ({want[:24]}…)")
    return AuditReport(ok=not problems, entries=count, head=head, problems=problems)


def describe(report: AuditReport) -> str:
    """The report as both command lines print it."""
    lines = [f"audit log: {report.entries} entries, head {report.head}"]
    lines += [f"  PROBLEM: {problem}" for problem in report.problems]
    lines.append("chain intact" if report.ok else "chain BROKEN")
    return "\n".join(lines)


class AuditLog:
    """The log as people read it on the admin API."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def entries(
        self, user: User, device_id: str | None = None, after: int = 0, limit: int | None = None
    ) -> list[AuditEntry]:
        """Up to ``limit`` entries (None: all) after sequence number ``after`` (of
        ``device_id``'s only)."""
        require(user, Operation.READ_AUDIT_LOG)
        where, args = ("device_id = ? AND seq > ?", [device_id, after]) if device_id else ("seq > ?", [after])
        sql = f"SELECT * FROM events WHERE {where} ORDER BY seq"
        rows = (
            self._store.all(sql, *args) if limit is None else self._store.all(sql + " LIMIT ?", *args, limit)
        )
        return [AuditEntry.model_validate(dict(r)) for r in rows]

    def verify(self, user: User, expect_head: str | None = None) -> AuditReport:
        require(user, Operation.READ_AUDIT_LOG)
        if expect_head is not None and not re.fullmatch(r"[0-9]{1,18}:[0-9a-f]{64}", expect_head):
            raise BadRequest("expect_head must be SEQ:SHA256 as audit verify printed it")
        return verify_chain(self._store, expect_head)
