"""The fleet's files: what each device runs, each file's content once, and when the fleet first
had it.

Crash reports list the files of the crashing devices (their drivers, channel files and driver
store); health reports list the same of the healthy ones (``InventoryUpdate``: whole the first
time, then as changes). Two tables keep it:

- ``file_contents``: one row per (path, sha256) the fleet has ever reported, with its size, its
  module version if any, and when and by which device it was first seen. A file that a
  million devices run is described once.
- ``device_files``: per device, the (path, sha256) it runs now, from its last health report
  (``devices.inventory_digest`` names that inventory, so a change list applies only on top of
  the inventory it was made from).

The correlation (correlation.py) compares the files of an incident's devices with those of
the healthy ones; ``first_seen_at`` gives each file's onset against the incident's first report.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Literal

from recovery_agent.protocol.wire import FileRecord, InventoryUpdate, inventory_digest

from .store import Tx

InventoryAnswer = Literal["stored", "send-whole"]


# (path, sha256) known to be in file_contents, per store (Store.memo), up to this many: a fleet
# reports the same few contents again and again, and each insert, even one that does nothing,
# cost a crash report about a sixth of its ingestion.
KNOWN_MAX = 1_000_000
_KNOWN = "fleetfiles.known"
_PENDING = "fleetfiles.pending"


LISTS = ("drivers", "channel_files", "driver_store")


# Stored reports whose payloads a view that walks an incident reads at once (the proposed fix,
# the correlation): a fleet's incident never sits in memory whole.
READ_PAGE = 500


def listed_files(payload: str, lists: tuple[str, ...] = LISTS) -> list[dict[str, Any]]:
    """The file records of a stored report's ``lists``, read as plain JSON: the server
    validated the report when it stored it, and a model parse costs many times more."""
    report = json.loads(payload)
    return [f for name in lists for f in report.get(name, ())]


def record_contents(tx: Tx, records: Iterable[FileRecord], at: str, device_id: str) -> None:
    """Remember each (path, sha256) of ``records`` the fleet had not reported before, first
    seen ``at`` by ``device_id``; the ones known already keep their first sighting."""
    known: set[tuple[str, str]] = tx.memo.setdefault(_KNOWN, set())
    new = {(r.path, r.sha256): r for r in records if (r.path, r.sha256) not in known}
    if not new:
        return
    tx.executemany(
        "INSERT INTO file_contents(path, sha256, size, version, first_seen_at, first_seen_by) "
        "VALUES (?,?,?,?,?,?) ON CONFLICT (path, sha256) DO NOTHING",
        [(r.path, r.sha256, r.size, r.version, at, device_id) for r in new.values()],
    )
    # Known once this transaction commits (a savepoint rolled back clears tx.cache: then they
    # are simply not remembered, and inserted again next time, which does nothing).
    if _PENDING not in tx.cache:
        tx.cache[_PENDING] = set()
        tx.after_commit.append(lambda: _remember(tx))
    tx.cache[_PENDING].update(new)


def _remember(tx: Tx) -> None:
    known: set[tuple[str, str]] = tx.memo.setdefault(_KNOWN, set())
    if len(known) > KNOWN_MAX:
        known.clear()
    known.update(tx.cache.get(_PENDING, ()))


def apply_update(tx: Tx, device_id: str, update: InventoryUpdate, at: str) -> InventoryAnswer:
    """Store the device's inventory after ``update``, or ask for the whole ('send-whole', and
    nothing is changed) when it was made on top of another inventory than the one stored, or
    the result is not the inventory the device says it has (its digest differs)."""
    if update.base is None:
        files = {r.path: r.sha256 for r in update.files}
    else:
        stored = tx.scalar("SELECT inventory_digest FROM devices WHERE device_id = ?", device_id)
        if stored != update.base:
            return "send-whole"
        files = {
            r["path"]: r["sha256"]
            for r in tx.all("SELECT path, sha256 FROM device_files WHERE device_id = ?", device_id)
        }
        for path in update.removed:
            files.pop(path, None)
        files.update((r.path, r.sha256) for r in update.files)
    if inventory_digest(files.items()) != update.digest:
        return "send-whole"
    mtimes = {r.path: r.mtime for r in update.files}
    if update.base is None:
        tx.execute("DELETE FROM device_files WHERE device_id = ?", device_id)
        changed = list(files)
    else:
        tx.executemany(
            "DELETE FROM device_files WHERE device_id = ? AND path = ?",
            [(device_id, p) for p in {*update.removed, *mtimes}],
        )
        changed = list(dict.fromkeys(r.path for r in update.files))
    tx.executemany(
        "INSERT INTO device_files(device_id, path, sha256, mtime) VALUES (?,?,?,?)",
        [(device_id, p, files[p], mtimes.get(p, 0.0)) for p in changed],
    )
    record_contents(tx, update.files, at, device_id)
    tx.execute(
        "UPDATE devices SET inventory_digest = ?, inventory_at = ? WHERE device_id = ?",
        update.digest,
        at,
        device_id,
    )
    return "stored"
