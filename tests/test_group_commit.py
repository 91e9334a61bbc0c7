"""Group commit (recovery_server/groupcommit.py): reports that arrive together are stored in one
transaction, each in its own savepoint; a report is acknowledged only once its transaction
committed; one bad report fails alone; a failed commit keeps nothing of its batch. And the
store's reads (store.py) never wait for a writer. On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import threading

import pytest

from recovery_agent.protocol.envelope import seal_bytes
from recovery_agent.protocol.keys import SigningKey
from recovery_server.errors import Conflict, Unauthorized

from .fleetsim import crash_report
from .test_server import BAD_PATH

DEVICES = 24


@pytest.fixture
async def devices(fleet) -> list[tuple[str, SigningKey]]:
    out = []
    for i in range(DEVICES):
        key = SigningKey.generate()
        await fleet.enroll(f"dev-{i:02d}", key)
        out.append((f"dev-{i:02d}", key))
    return out


def sealed(
    fleet, device_id: str, key: SigningKey, agent_nonce: str = "a" * 32, nonce: str | None = None
) -> bytes:
    nonce = nonce or fleet.service.challenge(device_id).nonce
    return seal_bytes(crash_report(device_id, nonce, agent_nonce), key)


async def test_reports_sent_together_share_one_commit_and_each_gets_its_own_receipt(fleet, devices):
    svc = fleet.service
    before = svc.commits.stats.batches
    receipts = await asyncio.gather(*(svc.submit_diagnostics(sealed(fleet, d, k)) for d, k in devices))
    # All were handed in before the writer first ran: one transaction stored them all.
    assert svc.commits.stats.batches == before + 1 and svc.commits.stats.largest == DEVICES
    assert svc.commits.stats.reruns == 0, "no write failed: no savepoints, no second run"
    assert len({r.report_id for r in receipts}) == DEVICES
    assert fleet.count("reports") == DEVICES and fleet.count("nonces") == DEVICES
    stored = {
        r["report_id"]: r["device_id"] for r in fleet.store.all("SELECT report_id, device_id FROM reports")
    }
    assert {stored[r.report_id] for r in receipts} == {d for d, _ in devices}
    assert svc.verify_audit(fleet.viewer).ok
    # Each receipt's poll token polls its own report.
    for receipt in receipts[:3]:
        assert svc.poll(receipt.report_id, receipt.poll_token).status == "pending"


async def test_a_replay_inside_a_batch_fails_alone_and_leaves_no_trace(fleet, devices):
    svc = fleet.service
    (d0, k0), rest = devices[0], devices[1:]
    nonce = svc.challenge(d0).nonce
    first, replay = sealed(fleet, d0, k0, "a" * 32, nonce), sealed(fleet, d0, k0, "b" * 32, nonce)
    outcomes = await asyncio.gather(
        *(svc.submit_diagnostics(raw) for raw in [sealed(fleet, d, k) for d, k in rest[:10]]),
        svc.submit_diagnostics(first),
        svc.submit_diagnostics(replay),
        *(svc.submit_diagnostics(raw) for raw in [sealed(fleet, d, k) for d, k in rest[10:]]),
        return_exceptions=True,
    )
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(refused) == 1 and isinstance(refused[0], Conflict), refused
    assert svc.commits.stats.largest == DEVICES + 1  # one batch, the replay rolled back inside it
    assert svc.commits.stats.reruns == 1, "run at once, then again with a savepoint per write"
    assert fleet.count("reports") == DEVICES and fleet.count("nonces") == DEVICES
    kinds = [
        r["kind"] for r in fleet.store.all("SELECT kind FROM events WHERE kind = 'diagnostics.received'")
    ]
    assert len(kinds) == DEVICES
    assert svc.verify_audit(fleet.viewer).ok


async def test_a_device_revoked_between_its_checks_and_its_write_is_refused(fleet, devices):
    svc = fleet.service
    (d0, k0), (d1, k1) = devices[0], devices[1]
    report = svc._incidents.check(sealed(fleet, d0, k0))  # checked while still enrolled
    svc.revoke_device(fleet.admin, d0)
    ok, refused = await asyncio.gather(
        svc.submit_diagnostics(sealed(fleet, d1, k1)),
        svc.commits.run(lambda tx: svc._incidents.write(tx, report)),
        return_exceptions=True,
    )
    assert isinstance(refused, Unauthorized) and "revoked" in str(refused)
    assert not isinstance(ok, BaseException)
    assert fleet.store.all("SELECT device_id FROM reports")[0]["device_id"] == d1
    assert fleet.count("reports") == 1 and svc.verify_audit(fleet.viewer).ok


class _FailingCommit:
    """The store's write connection, failing at COMMIT as a full or failing disk does (an
    emulation of the disk fault: the statement raises the error SQLite and PostgreSQL raise)."""

    def __init__(self, db) -> None:
        self._db = db

    def execute(self, sql: str, args: tuple = (), /):
        if sql == "COMMIT":
            raise OSError("disk I/O error (injected at COMMIT)")
        return self._db.execute(sql, args)

    def close(self) -> None:
        self._db.close()


async def test_a_failed_commit_fails_every_report_of_its_batch_and_keeps_none(fleet, devices):
    svc = fleet.service
    raws = [sealed(fleet, d, k) for d, k in devices]
    real = fleet.store._db
    fleet.store._db = _FailingCommit(real)
    try:
        outcomes = await asyncio.gather(*(svc.submit_diagnostics(r) for r in raws), return_exceptions=True)
    finally:
        fleet.store._db = real
    assert all(isinstance(o, OSError) for o in outcomes), outcomes
    assert fleet.count("reports") == 0 and fleet.count("nonces") == 0
    assert svc.verify_audit(fleet.viewer).ok
    # Nothing was spent: the same reports are taken once the disk is back.
    receipts = await asyncio.gather(*(svc.submit_diagnostics(r) for r in raws))
    assert len(receipts) == DEVICES and fleet.count("reports") == DEVICES


async def test_reports_over_http_are_stored_once_each(fleet, devices):
    from .test_server import report

    results = await asyncio.gather(*(report(fleet, d, k) for d, k in devices))
    assert len({receipt.report_id for _, receipt in results}) == DEVICES
    assert fleet.count("reports") == DEVICES
    assert fleet.service.verify_audit(fleet.viewer).ok


def test_reads_do_not_wait_for_an_open_write_and_see_only_what_committed(fleet):
    store = fleet.store
    opened, release, done = threading.Event(), threading.Event(), threading.Event()

    def writer() -> None:
        with store.tx() as tx:
            tx.execute("INSERT INTO schema_meta VALUES ('probe', 'written')")
            # Inside its own transaction, a thread reads what it wrote.
            assert store.scalar("SELECT value FROM schema_meta WHERE key = 'probe'") == "written"
            opened.set()
            release.wait(60)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert opened.wait(60)
        # The writer holds its transaction open; this read answers at once, without its row.
        assert store.scalar("SELECT value FROM schema_meta WHERE key = 'probe'") is None
    finally:
        release.set()
        thread.join(60)
    assert done.is_set()
    assert store.scalar("SELECT value FROM schema_meta WHERE key = 'probe'") == "written"


async def test_polls_woken_by_one_approval_each_get_one_directive_issued_in_shared_commits(fleet, devices):
    from recovery_agent.protocol.envelope import open_directive
    from recovery_server.app import METRICS

    from .test_agent_flow import wait_for
    from .test_server import BAD_SHA, poll, report

    fleet.poll_tick_s = 3600  # only the approval's wake-up ends the polls
    await fleet.restart()
    reports = await asyncio.gather(*(report(fleet, d, k) for d, k in devices))
    incident = reports[0][1].incident_id
    rem = fleet.service.create_remediation(
        fleet.user("alice"),
        title="q",
        incident_id=incident,
        actions=[{"type": "quarantine_file", "path": BAD_PATH, "sha256": BAD_SHA}],
    )
    # Each device polls twice at once (an agent retrying): still one directive per report.
    polls = [asyncio.create_task(poll(fleet, receipt, wait=60)) for _, receipt in reports for _ in range(2)]
    metrics = fleet.server.app[METRICS]
    await wait_for(lambda: metrics.long_polls_waiting == 2 * DEVICES, timeout=60)
    writes = fleet.service.commits.stats.writes
    fleet.service.approve(fleet.user("bob"), rem.remediation_id)
    answers = await asyncio.wait_for(asyncio.gather(*polls), 120)
    assert all(a.status == "directive" for a in answers)
    ring = {fleet.key.key_id: fleet.key.public}
    for i, ((device_id, _), (_, receipt)) in enumerate(zip(devices, reports, strict=True)):
        ids = {
            open_directive(
                a.envelope,
                ring,
                device_id=device_id,
                agent_nonce="a" * 32,
                diagnostics_sha256=receipt.diagnostics_sha256,
                now=fleet.service.now(),
            ).message.directive_id
            for a in answers[2 * i : 2 * i + 2]
        }
        assert len(ids) == 1, (device_id, ids)
    assert fleet.count("directives") == DEVICES
    assert fleet.service.commits.stats.writes >= writes + DEVICES  # issued through group commit
    assert fleet.service.verify_audit(fleet.viewer).ok


async def test_results_and_healthy_boots_sent_together_are_each_recorded_once_in_shared_commits(
    fleet, devices
):
    from recovery_agent.protocol.client import DeviceClient
    from recovery_agent.protocol.keys import key_id
    from recovery_agent.protocol.wire import Health, Result, utcnow

    from .conftest import FAST_RETRY
    from .fleetsim import BAD_PATH as PATH
    from .fleetsim import BAD_SHA as SHA
    from .fleetsim import HttpDevice

    fleet.poll_tick_s = 3600
    await fleet.restart()
    ring = {key_id(fleet.key.public): fleet.key.public}
    async with DeviceClient(fleet.url, retry=FAST_RETRY) as client:
        fleet_devices = [HttpDevice(d, client, ring, key=k) for d, k in devices]
        receipts = await asyncio.gather(*(dev.report() for dev in fleet_devices))
        rem = fleet.service.create_remediation(
            fleet.user("alice"),
            title="q",
            incident_id=receipts[0].incident_id,
            actions=[{"type": "quarantine_file", "path": PATH, "sha256": SHA}],
        )
        fleet.service.approve(fleet.user("bob"), rem.remediation_id)
        assert all(await asyncio.gather(*(dev.poll() for dev in fleet_devices)))
        writes, batches = fleet.service.commits.stats.writes, fleet.service.commits.stats.batches
        # Every device's result and healthy boot, each envelope sent twice at once (an agent
        # retrying): four devices report that the fix failed, and have no healthy boot.
        failing = {dev.device_id for dev in fleet_devices[:4]}
        sends = []
        for dev, (_, key) in zip(fleet_devices, devices, strict=True):
            outcome = "failed" if dev.device_id in failing else "applied"
            result = seal_bytes(
                Result(
                    device_id=dev.device_id,
                    directive_id=dev.directive_id,
                    outcome=outcome,
                    created_at=utcnow(),
                ),
                key,
            )
            sends += [client.send_result(result), client.send_result(result)]
            if outcome == "applied":
                health = seal_bytes(
                    Health(
                        device_id=dev.device_id,
                        directive_id=dev.directive_id,
                        boot_id="b-1",
                        created_at=utcnow(),
                    ),
                    key,
                )
                sends += [client.send_health(health), client.send_health(health)]
        answers = await asyncio.gather(*sends)
    # Each envelope recorded once; its copy answered as a duplicate.
    assert sorted(a["status"] for a in answers) == sorted(["recorded", "duplicate"] * (len(answers) // 2))
    assert fleet.count("results") == DEVICES
    assert fleet.count("health") == DEVICES - len(failing)
    outcomes = {
        r["device_id"]: r["outcome"] for r in fleet.store.all("SELECT device_id, outcome FROM directives")
    }
    assert outcomes == {d: "failed" if d in failing else "succeeded" for d, _ in devices}
    stats = fleet.service.commits.stats
    assert stats.writes - writes == len(answers)  # all through the group commit
    assert stats.batches - batches < stats.writes - writes  # and some of them shared a commit
    assert fleet.service.verify_audit(fleet.viewer).ok


async def test_a_write_rolled_back_after_appending_to_the_audit_log_leaves_one_chain(fleet):
    """The chain's head is read once per transaction and kept (audit.py); a write rolled back to
    its savepoint takes its entries and that kept head with it."""
    from recovery_server import audit

    svc, now = fleet.service, "2026-11-30T00:00:00Z"

    def good(tag: str):
        return lambda tx: audit.record(tx, now, "test.kept", "t", subject=tag)

    def bad(tx):
        audit.record(tx, now, "test.dropped", "t", subject="x")
        audit.record(tx, now, "test.dropped", "t", subject="y")
        raise Conflict("refused after appending")

    outcomes = await asyncio.gather(
        svc.commits.run(good("a")), svc.commits.run(bad), svc.commits.run(good("b")), return_exceptions=True
    )
    assert isinstance(outcomes[1], Conflict) and outcomes[0] + 1 == outcomes[2]
    rows = fleet.store.all("SELECT seq, kind, subject, hash FROM events ORDER BY seq DESC LIMIT 2")
    assert [(r["kind"], r["subject"]) for r in rows] == [("test.kept", "b"), ("test.kept", "a")]
    head = fleet.store.scalar("SELECT value FROM schema_meta WHERE key = 'audit_head'")
    assert head == f"{rows[0]['seq']}:{rows[0]['hash']}"
    assert svc.verify_audit(fleet.viewer).ok
