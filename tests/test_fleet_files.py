"""The fleet's inventory (recovery_server/fleetfiles.py, recovery_agent/agent.py report_health):
a healthy device sends what it runs whole the first time, then as changes; the server keeps
each file's content once with its first sighting in the fleet, and asks for the whole again
when it and the device disagree. Through the real agent and HTTP API, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import timedelta

from recovery_agent.agent import report_health
from recovery_agent.layout import SENT_INVENTORY
from recovery_agent.protocol.client import DeviceClient
from recovery_agent.protocol.envelope import seal_bytes
from recovery_agent.protocol.keys import SigningKey
from recovery_agent.protocol.wire import FileRecord, Health, InventoryUpdate, inventory_digest, utcnow

from .conftest import enrolled_settings
from .test_server import report

CHANNELS = "var/lib/sensor/channels"


def stored(fleet, device_id: str) -> dict[str, str]:
    return {
        r["path"]: r["sha256"]
        for r in fleet.store.all("SELECT path, sha256 FROM device_files WHERE device_id = ?", device_id)
    }


def on_disk(os_root) -> dict[str, str]:
    return {
        str(p.relative_to(os_root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((os_root / CHANNELS).iterdir())
    }


async def test_a_healthy_device_sends_its_inventory_whole_then_only_what_changed(fleet, machine, monkeypatch):
    settings = await enrolled_settings(fleet, machine)
    os_root = machine / "os"

    answer = await report_health(settings, boot_id="boot-1")
    assert answer == {"status": "recorded", "inventory": "stored"}
    assert stored(fleet, "dev-0001") == on_disk(os_root)
    first = fleet.store.all("SELECT path, sha256, first_seen_at, first_seen_by FROM file_contents")
    assert {(r["path"], r["sha256"]) for r in first} == set(on_disk(os_root).items())
    assert {r["first_seen_by"] for r in first} == {"dev-0001"}
    assert json.loads((os_root / SENT_INVENTORY).read_text()) == on_disk(os_root)

    # One channel file changes, one is new, one goes away: the next report sends those three.
    names = sorted(p.name for p in (os_root / CHANNELS).iterdir())
    (os_root / CHANNELS / names[0]).write_bytes(b"\xaa" * 64)
    (os_root / CHANNELS / names[1]).unlink()
    (os_root / CHANNELS / "C-00000999-00000000-00000001.sys").write_bytes(b"\xbb" * 64)
    sent = []
    original = DeviceClient.send_health

    async def spy(self, envelope: bytes):
        sent.append(envelope)
        return await original(self, envelope)

    monkeypatch.setattr(DeviceClient, "send_health", spy)
    answer = await report_health(settings, boot_id="boot-2")
    assert answer == {"status": "recorded", "inventory": "stored"}
    [envelope] = sent  # one request: the change list was taken
    update = json.loads(base64.b64decode(json.loads(envelope)["payload"]))["inventory"]
    assert update["base"] is not None
    assert sorted(f["path"] for f in update["files"]) == sorted(
        [f"{CHANNELS}/{names[0]}", f"{CHANNELS}/C-00000999-00000000-00000001.sys"]
    )
    assert update["removed"] == [f"{CHANNELS}/{names[1]}"]
    assert stored(fleet, "dev-0001") == on_disk(os_root)
    # The new contents are first seen now; the ones seen before keep their first sighting.
    again = {
        (r["path"], r["sha256"]): r["first_seen_at"] for r in fleet.store.all("SELECT * FROM file_contents")
    }
    assert all(again[(r["path"], r["sha256"])] == r["first_seen_at"] for r in first)
    assert len(again) == len(first) + 2


async def test_a_change_list_on_another_base_is_refused_and_the_agent_sends_the_whole(fleet, machine):
    settings = await enrolled_settings(fleet, machine)
    os_root = machine / "os"
    assert (await report_health(settings, boot_id="boot-1"))["inventory"] == "stored"
    # The agent's record says the server holds another inventory than it does (a restored
    # backup, a server rebuilt): its change list is refused and it sends the whole, same boot.
    (os_root / SENT_INVENTORY).write_text(json.dumps({f"{CHANNELS}/C-gone.sys": "0" * 64}))
    (os_root / CHANNELS / "C-00000999-00000000-00000001.sys").write_bytes(b"\xcc" * 64)
    answer = await report_health(settings, boot_id="boot-2")
    assert answer == {"status": "recorded", "inventory": "stored"}
    assert stored(fleet, "dev-0001") == on_disk(os_root)
    # A damaged record is no record: the whole goes again.
    (os_root / SENT_INVENTORY).write_text("{not json")
    assert await report_health(settings, boot_id="boot-3") == {"status": "recorded", "inventory": "stored"}
    assert stored(fleet, "dev-0001") == on_disk(os_root)


async def test_an_inventory_whose_digest_does_not_match_changes_nothing(fleet):
    key = SigningKey.generate()
    await fleet.enroll("dev-x", key)
    rec = FileRecord(path=f"{CHANNELS}/C-1.sys", size=3, mtime=0, sha256="a" * 64)
    wrong = InventoryUpdate(digest="f" * 64, files=[rec])
    health = Health(device_id="dev-x", boot_id="b1", created_at=utcnow(), inventory=wrong)
    answer = await fleet.service.submit_health(seal_bytes(health, key))
    assert answer == {"status": "recorded", "inventory": "send-whole"}
    assert stored(fleet, "dev-x") == {} and fleet.count("file_contents") == 0
    right = InventoryUpdate(digest=inventory_digest([(rec.path, rec.sha256)]), files=[rec])
    health = Health(
        device_id="dev-x", boot_id="b1", created_at=utcnow() + timedelta(seconds=1), inventory=right
    )
    # The same boot again, now with the inventory: the boot is a duplicate, the inventory is stored.
    assert await fleet.service.submit_health(seal_bytes(health, key)) == {
        "status": "duplicate",
        "inventory": "stored",
    }
    assert stored(fleet, "dev-x") == {rec.path: rec.sha256}


async def test_crash_reports_give_the_fleet_its_first_sighting_of_a_file(fleet):
    key = SigningKey.generate()
    await fleet.enroll("dev-c", key)
    await report(fleet, "dev-c", key)
    rows = fleet.store.all("SELECT path, first_seen_by FROM file_contents")
    assert rows and {r["first_seen_by"] for r in rows} == {"dev-c"}


def test_a_content_is_remembered_as_stored_only_once_its_transaction_committed(fleet):
    from recovery_server.fleetfiles import record_contents

    rec = FileRecord(path=f"{CHANNELS}/C-9.sys", size=1, mtime=0, sha256="c" * 64)
    store = fleet.store
    try:
        with store.tx() as tx:
            record_contents(tx, [rec], "2026-01-01T00:00:00Z", "dev-a")
            raise RuntimeError("the transaction fails after the insert")
    except RuntimeError:
        pass
    assert fleet.count("file_contents") == 0
    # Not believed stored: the next report of it inserts it.
    with store.tx() as tx:
        record_contents(tx, [rec], "2026-01-02T00:00:00Z", "dev-b")
    rows = store.all("SELECT first_seen_at, first_seen_by FROM file_contents")
    assert [(r[0], r[1]) for r in rows] == [("2026-01-02T00:00:00Z", "dev-b")]
    # A savepoint rolled back inside a committed transaction (a group-commit write that failed).
    other = FileRecord(path=f"{CHANNELS}/C-10.sys", size=1, mtime=0, sha256="d" * 64)
    with store.tx() as tx:
        try:
            with tx.savepoint():
                record_contents(tx, [other], "2026-01-03T00:00:00Z", "dev-c")
                raise RuntimeError("this write fails alone")
        except RuntimeError:
            pass
    with store.tx() as tx:
        record_contents(tx, [other], "2026-01-04T00:00:00Z", "dev-d")
    assert store.one("SELECT first_seen_by FROM file_contents WHERE path = ?", other.path)[0] == "dev-d"
    # Known and committed: a later report of both writes nothing.
    with store.tx() as tx:
        before = tx.after_commit[:]
        record_contents(tx, [rec, other], "2026-01-05T00:00:00Z", "dev-e")
        assert tx.after_commit == before, "nothing new to insert"


def test_a_read_apart_sees_one_snapshot_and_leaves_the_shared_reads_free(fleet):
    store = fleet.store
    with store.reading_apart() as db:
        before = db.scalar("SELECT count(*) FROM users")
        fleet.service.create_user(fleet.admin, "late", "viewer")  # committed meanwhile
        assert db.scalar("SELECT count(*) FROM users") == before, "one snapshot"
        # Its own connection: the shared read connection is not held by it.
        assert store._read_lock.acquire(blocking=False)
        store._read_lock.release()
        assert store.scalar("SELECT count(*) FROM users") == before + 1


async def test_an_inventory_too_large_for_one_report_sends_the_most_recently_changed(
    fleet, machine, monkeypatch
):
    import os

    from recovery_agent import agent

    settings = await enrolled_settings(fleet, machine)
    channels = machine / "os" / CHANNELS
    for i in range(40):
        path = channels / f"C-{i:08d}-00000000-00000001.sys"
        path.write_bytes(bytes([i]) * 32)
        os.utime(path, (1_000_000 + i, 1_000_000 + i))  # the higher i, the more recent
    whole = on_disk(machine / "os")
    monkeypatch.setattr(agent, "HEALTH_MAX_BYTES", 6000)
    answer = await report_health(settings, boot_id="boot-1")
    assert answer == {"status": "recorded", "inventory": "stored"}
    sent = stored(fleet, "dev-0001")
    assert 0 < len(sent) < len(whole) and all(whole[p] == h for p, h in sent.items())
    by_age = sorted(channels.iterdir(), key=lambda p: (-p.stat().st_mtime, p.name))
    newest = {f"{CHANNELS}/{p.name}" for p in by_age[: len(sent)]}
    assert set(sent) == newest, "the most recently changed files"
    # The next report is a change list against what was sent, and still fits.
    assert (await report_health(settings, boot_id="boot-2"))["inventory"] == "stored"
