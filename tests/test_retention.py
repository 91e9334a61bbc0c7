"""Each report stored once, the schema migration that made it so, and retention: what is
pruned, what is kept, that it is audited, and that no view breaks afterwards."""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from recovery_agent.protocol.envelope import open_envelope, seal, seal_bytes
from recovery_agent.protocol.keys import SigningKey, public_b64
from recovery_agent.protocol.wire import (
    BootState,
    CrashKind,
    CrashSignature,
    Diagnostics,
    Enrollment,
    FileRecord,
    Health,
    SystemInfo,
    utcnow,
)
from recovery_server import store as store_mod
from recovery_server.access import console
from recovery_server.store import Store

from .conftest import postgres_schema

BAD_PATH = "var/lib/sensor/channels/C-00000291-00000000-00000032.sys"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Clocked:
    """The fleet's service on a clock the test moves, and what its devices need."""

    def __init__(self, fleet) -> None:
        self.fleet = fleet
        self.service = fleet.service
        self.t = T0
        self.service.clock = lambda: self.t

    def enroll(self, device_id: str) -> SigningKey:
        key = SigningKey.generate()
        msg = Enrollment(
            device_id=device_id,
            public_key=public_b64(key.public),
            enrollment_token=self.fleet.enrollment_token,
            created_at=utcnow(),
        )
        self.service.enroll(seal_bytes(msg, key))
        return key

    def diagnostics(self, device_id: str) -> Diagnostics:
        return Diagnostics(
            device_id=device_id,
            server_nonce=self.service.challenge(device_id).nonce,
            agent_nonce=secrets.token_urlsafe(24),
            created_at=utcnow(),
            agent_version="t",
            boot=BootState(boot_count=2, boot_limit=2),
            crash=CrashSignature(
                kind=CrashKind.KERNEL_PANIC, title="general protection fault in f", channel_file=BAD_PATH
            ),
            system=SystemInfo(),
            channel_files=[
                FileRecord(path=path, size=1, mtime=0, sha256="b" * 64)
                for path in [BAD_PATH] + [f"var/lib/sensor/channels/C-{i:08d}.sys" for i in range(200)]
            ],
        )

    def report(self, device_id: str, key: SigningKey):
        return self.service.accept_diagnostics(seal_bytes(self.diagnostics(device_id), key))


@pytest.fixture
def lab(fleet) -> Clocked:
    return Clocked(fleet)


# ---------------------------------------------------------------- stored once


async def test_each_report_is_stored_once_and_its_envelope_can_be_rebuilt(fleet, lab):
    key = lab.enroll("dev-1")
    env = seal(lab.diagnostics("dev-1"), key)
    receipt = lab.service.accept_diagnostics(json.dumps(env).encode())
    row = fleet.store.one("SELECT * FROM reports WHERE report_id = ?", receipt.report_id)
    assert "envelope" not in row.keys()
    payload = base64.b64decode(env["payload"])
    stored = sum(len(str(row[k])) for k in row.keys())
    assert stored < len(payload) + 1000, "the payload is kept once, not twice"
    rebuilt = {
        "payload": base64.b64encode(row["payload"].encode()).decode(),
        "payloadType": Diagnostics.PAYLOAD_TYPE,
        "signatures": json.loads(row["signatures"]),
    }
    verified = open_envelope(rebuilt, Diagnostics, {key.key_id: key.public})
    assert verified.payload_sha256 == receipt.diagnostics_sha256 == row["diagnostics_sha256"]


def _version_2_database(url: str) -> dict:
    """A database as a version-2 server left it, with a device and one report."""
    if url.startswith("postgresql"):
        db = store_mod._connect_postgres(url)
    else:
        db = store_mod._connect_sqlite(Path(url))
    for statement in store_mod._SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)
    for statement in store_mod._MIGRATIONS[2]:
        db.execute(statement)
    db.execute("INSERT INTO schema_meta VALUES ('version', '2')")
    key = SigningKey.generate()
    d = Diagnostics(
        device_id="old-1",
        server_nonce="n" * 32,
        agent_nonce="a" * 32,
        created_at=utcnow(),
        agent_version="t",
        boot=BootState(boot_count=2, boot_limit=2, recovery_attempts=2),
        crash=CrashSignature(kind=CrashKind.KERNEL_PANIC, title="old crash"),
        system=SystemInfo(),
    )
    env = seal(d, key)
    db.execute(
        "INSERT INTO devices(device_id, public_key, key_id, enrolled_at) VALUES (?,?,?,?)",
        ("old-1", public_b64(key.public), key.key_id, "2026-01-01T00:00:00Z"),
    )
    db.execute(
        "INSERT INTO incidents VALUES (?,?,?,?,?,?,?,?,?,1)",
        (
            "INC-old",
            "s" * 16,
            "kernel_panic",
            "old crash",
            None,
            None,
            None,
            "2026-01-01T00:00:00Z",
            "2026-01-01T00:00:00Z",
        ),
    )
    db.execute(
        "INSERT INTO reports VALUES (?,?,?,?,?,?,?,?,?)",
        (
            "rpt-old",
            "old-1",
            "INC-old",
            "c" * 64,
            "a" * 32,
            "d" * 64,
            "2026-01-01T00:00:00Z",
            base64.b64decode(env["payload"]).decode(),
            json.dumps(env),
        ),
    )
    db.close()  # both connections commit each statement
    return env


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_version_2_database_is_migrated_to_store_reports_once(backend, tmp_path):
    def check(url: str) -> None:
        env = _version_2_database(url)
        s = Store(url)
        assert s.scalar("SELECT value FROM schema_meta WHERE key = 'version'") == str(
            store_mod.SCHEMA_VERSION
        )
        row = s.one("SELECT * FROM reports WHERE report_id = 'rpt-old'")
        assert "envelope" not in row.keys()
        assert json.loads(row["signatures"]) == env["signatures"]
        assert Diagnostics.model_validate_json(row["payload"]).crash.title == "old crash"
        # Whole numbers a device may send fit recovery_attempts on both databases now.
        with s.tx() as tx:
            tx.execute("UPDATE devices SET recovery_attempts = ? WHERE device_id = 'old-1'", 2**53 - 1)
        assert s.scalar("SELECT recovery_attempts FROM devices") == 2**53 - 1
        s.close()
        Store(url).close()  # a second start migrates nothing

    if backend == "sqlite":
        check(str(tmp_path / "v2.db"))
    else:
        with postgres_schema() as url:
            check(url)


# ---------------------------------------------------------------- retention


async def test_prune_deletes_superseded_reports_and_expired_nonces_and_keeps_every_view(fleet, lab):
    service = lab.service
    key1, key2 = lab.enroll("dev-1"), lab.enroll("dev-2")
    reports = []
    for day, device, key in ((0, "dev-1", key1), (1, "dev-1", key1), (2, "dev-1", key1), (0, "dev-2", key2)):
        lab.t = T0 + timedelta(days=day)
        reports.append(lab.report(device, key))
    incident = reports[0].incident_id
    # A directive answered dev-1's first report: that report stays whatever its age.
    lab.t = T0 + timedelta(days=3)
    fleet.approve_suggested(incident)
    assert service.poll(reports[0].report_id, reports[0].poll_token).status == "directive"
    for day in (3, 4):
        lab.t = T0 + timedelta(days=day)
        health = Health(device_id="dev-2", boot_id=f"boot-{day}", created_at=utcnow())
        service.accept_health(seal_bytes(health, key2))
    # A newer report of dev-1, inside the retention period: all of dev-1's old ones are superseded.
    lab.t = T0 + timedelta(days=95)
    reports.append(lab.report("dev-1", key1))
    before = service.incident(fleet.viewer, incident)
    assert fleet.count("nonces") == 5

    lab.t = T0 + timedelta(days=100)
    admin, keep = console("test"), timedelta(days=90)
    dry = service.prune(admin, keep, dry_run=True)
    assert (dry.reports, dry.health, dry.nonces) == (2, 2, 5)
    assert fleet.count("reports") == 5, "a dry run deletes nothing"
    pruned = service.prune(admin, keep)
    assert pruned == dry
    kept = {r["report_id"] for r in fleet.store.all("SELECT report_id FROM reports")}
    assert kept == {reports[0].report_id, reports[3].report_id, reports[4].report_id}
    assert fleet.count("nonces") == 0 and fleet.count("health") == 0
    after = service.incident(fleet.viewer, incident)
    assert after.devices == before.devices == ["dev-1", "dev-2"]
    assert after.report_count == before.report_count == 5
    assert service.suggest_actions(fleet.viewer, incident).actions
    assert service.poll(reports[0].report_id, reports[0].poll_token).status == "directive"
    assert service.poll(reports[4].report_id, reports[4].poll_token).status == "directive"
    assert service.verify_audit(fleet.viewer).ok
    [entry] = [e for e in service.events(fleet.viewer) if e.kind == "retention.pruned"]
    assert json.loads(entry.detail) == {
        "before": "2026-01-11T00:00:00Z",
        "reports": 2,
        "health": 2,
        "nonces": 5,
        "tests": 0,
    }
    again = service.prune(admin, keep)
    assert (again.reports, again.health, again.nonces) == (0, 0, 0)
    assert [e.kind for e in service.events(fleet.viewer)].count("retention.pruned") == 1, "nothing to say"


async def test_prune_deletes_superseded_recovery_tests_and_keeps_each_devices_latest(fleet, lab):
    service = lab.service
    keys = {"dev-1": lab.enroll("dev-1"), "dev-2": lab.enroll("dev-2")}
    tests = []
    for day, device in ((0, "dev-1"), (1, "dev-1"), (95, "dev-1"), (0, "dev-2")):
        lab.t = T0 + timedelta(days=day)
        visit = lab.diagnostics(device).model_copy(update={"test_mode": True})
        tests.append(service.accept_diagnostics(seal_bytes(visit, keys[device])).report_id)
    assert fleet.count("recovery_tests") == 4 and fleet.count("reports") == 0

    lab.t = T0 + timedelta(days=100)
    admin, keep = console("test"), timedelta(days=90)
    dry = service.prune(admin, keep, dry_run=True)
    assert dry.tests == 2 and fleet.count("recovery_tests") == 4
    assert "2 superseded recovery test(s)" in dry.describe(dry_run=True)
    assert service.prune(admin, keep) == dry
    kept = {r["test_id"] for r in fleet.store.all("SELECT test_id FROM recovery_tests")}
    assert kept == {tests[2], tests[3]}, "dev-1's latest (inside the period) and dev-2's only test"
    [entry] = [e for e in service.events(fleet.viewer) if e.kind == "retention.pruned"]
    assert json.loads(entry.detail)["tests"] == 2
    assert service.verify_audit(fleet.viewer).ok


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recovery_server.cli", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_recovery_server_prune_on_the_command_line(tmp_path, store_url):
    data = str(tmp_path / "data")
    assert _cli("--data", data, "init", "--token-file", str(tmp_path / "admin.token")).returncode == 0
    p = _cli("--data", data, "prune", "--dry-run")
    assert p.returncode == 0 and "would delete 0 superseded report(s)" in p.stdout, p.stderr
    p = _cli("--data", data, "prune", "--keep-days", "30")
    assert p.returncode == 0 and "deleted 0 superseded report(s)" in p.stdout, p.stderr
    p = _cli("--data", data, "prune", "--keep-days", "0")
    assert p.returncode == 2 and "would keep everything" in p.stderr
    p = _cli("--data", data, "prune", "--keep-days", "soon")
    assert p.returncode == 2 and "not a number of days" in p.stderr
