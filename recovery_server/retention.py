"""Retention: what the server deletes once it is old, and what it keeps for good.

A fleet that keeps failing to boot sends a report per recovery visit, and a device may send
far more than that; kept forever they fill the disk. ``prune`` deletes, older than the
retention period (``ServiceSettings.report_retention``, 90 days by default):

- **reports** that were superseded: a device reported the same incident again later. Each
  device's latest report of each incident is kept, so an incident's view still lists every
  device it was seen on, with that device's latest evidence, and its suggested fix is still
  drawn from it; and every report a directive answered is kept (the directive refers to it,
  and the rollout counts it).
- **health reports** (healthy boots) that confirm no directive; those that confirm one are
  the proof that a fix worked.
- **recovery tests** (``recoverytests.py``: a test visit's report and its directive) that a
  later test of the same device superseded; each device's latest is kept.
- **spent challenge nonces** once they expired, whatever the retention period: an expired
  nonce is refused before the table is read (``challenges.py``).

Nothing else is ever deleted: not incidents (their counts stay), remediations, directives,
results, people, and never the audit log, whose hash chain would break. Each batch of
deletions is one transaction with its own audit entry (``retention.pruned``), so a prune cut
short leaves the store consistent and says how far it got. The server prunes by itself every
hour while it serves (``app.py``); ``recovery-server prune`` does it on demand.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from . import audit
from .store import Reader, Store, Tx, iso

BATCH = 5000

# A report is superseded when the same device reported the same incident after it.
_SUPERSEDED_REPORTS = """
    FROM reports r
    WHERE r.received_at < ?
      AND NOT EXISTS (SELECT 1 FROM directives d WHERE d.report_id = r.report_id)
      AND EXISTS (
          SELECT 1 FROM reports later
          WHERE later.incident_id = r.incident_id AND later.device_id = r.device_id
            AND (later.received_at > r.received_at
                 OR (later.received_at = r.received_at AND later.report_id > r.report_id)))
"""
_OLD_HEALTH = "FROM health WHERE received_at < ? AND directive_id IS NULL"
# A recovery test is superseded when the same device was tested after it.
_SUPERSEDED_TESTS = """
    FROM recovery_tests t
    WHERE t.visited_at < ?
      AND EXISTS (
          SELECT 1 FROM recovery_tests later
          WHERE later.device_id = t.device_id
            AND (later.visited_at > t.visited_at
                 OR (later.visited_at = t.visited_at AND later.test_id > t.test_id)))
"""
_EXPIRED_NONCES = "FROM nonces WHERE expires_at < ?"


@dataclass(frozen=True)
class Pruned:
    """What a prune deleted (or, dry, would delete): counts of rows, and the cutoff used."""

    reports: int
    health: int
    nonces: int
    cutoff: str
    tests: int = 0

    def describe(self, dry_run: bool = False) -> str:
        verb = "would delete" if dry_run else "deleted"
        return (
            f"{verb} {self.reports} superseded report(s), {self.health} health report(s) and "
            f"{self.tests} superseded recovery test(s) from before {self.cutoff}, and {self.nonces} "
            "expired challenge nonce(s); kept each device's latest report of each incident and its "
            "latest recovery test, every report a directive answered, and the audit log"
        )


def _count(db: Reader, where: str, *args: str) -> int:
    return int(db.scalar(f"SELECT count(*) {where}", *args))


def prune(store: Store, now: datetime, keep: timedelta, actor: str, *, dry_run: bool = False) -> Pruned:
    """Delete what retention allows (see the module docstring), in batches, each audited."""
    cutoff, at = iso(now - keep), iso(now)
    if dry_run:
        return Pruned(
            _count(store, _SUPERSEDED_REPORTS, cutoff),
            _count(store, _OLD_HEALTH, cutoff),
            _count(store, _EXPIRED_NONCES, at),
            cutoff,
            _count(store, _SUPERSEDED_TESTS, cutoff),
        )
    total = Pruned(0, 0, 0, cutoff)
    while True:
        with store.tx() as tx:
            batch = Pruned(
                _delete(tx, "reports", "report_id", _SUPERSEDED_REPORTS, cutoff),
                _delete(tx, "health", "device_id, boot_id", _OLD_HEALTH, cutoff),
                _delete(tx, "nonces", "nonce", _EXPIRED_NONCES, at),
                cutoff,
                _delete(tx, "recovery_tests", "test_id", _SUPERSEDED_TESTS, cutoff),
            )
            if batch.reports or batch.health or batch.nonces or batch.tests:
                audit.record(
                    tx,
                    at,
                    "retention.pruned",
                    actor,
                    detail={
                        "before": cutoff,
                        "reports": batch.reports,
                        "health": batch.health,
                        "nonces": batch.nonces,
                        "tests": batch.tests,
                    },
                )
        total = Pruned(
            total.reports + batch.reports,
            total.health + batch.health,
            total.nonces + batch.nonces,
            cutoff,
            total.tests + batch.tests,
        )
        if max(batch.reports, batch.health, batch.nonces, batch.tests) < BATCH:
            return total


def _delete(tx: Tx, table: str, key: str, where: str, *args: str) -> int:
    """Delete up to BATCH rows of ``table`` matching ``where`` (by their ``key`` columns)."""
    rows = tx.all(f"SELECT {key} {where} LIMIT {BATCH}", *args)
    columns = [c.strip() for c in key.split(",")]
    match = " AND ".join(f"{c} = ?" for c in columns)
    for row in rows:
        tx.execute(f"DELETE FROM {table} WHERE {match}", *(row[i] for i in range(len(columns))))
    return len(rows)
