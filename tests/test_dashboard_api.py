"""The read views behind the dashboard's incident and device pages, over HTTP (no browser):
an incident's summary (the crash of its first report, not every report) and timeline (reports,
directives and outcomes per bucket, approvals and rollouts marked), and a device with its
reports, directives and results, on both stores. Unknown ids are 404s that say where to look;
everyone with a token reads them, nobody without one.

``incident_over_time`` builds the fleet the browser tests open too: a crash that spikes,
a fix approved by two people and rolled out in two waves, one device it fails on, and one
late report after the fix."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aiohttp

from recovery_agent.protocol.crashreport import RULES_VERSION
from recovery_agent.protocol.envelope import seal_bytes
from recovery_agent.protocol.wire import Health, Result, utcnow
from recovery_server.timeline import bucket_size

from .fleetsim import CRASH, FleetSim, SimDevice, crash_report
from .test_api_contract import SQLITE_ONLY

# A crash excerpt with markup in it: the page must show it as text.
EXCERPT = (
    "BUG: unable to handle page fault for address: ffffb0a1c0de0000\n"
    '<img src=x onerror="window.pwned=1"> & <b>not bold</b>\n'
    "RIP: 0010:sensor_parse_channel+0x2a/0x90 [sensor]\n"
)
EXCERPT_CRASH = CRASH.model_copy(update={"excerpt": EXCERPT, "rules_version": RULES_VERSION})
# Minutes after the start at which each device reports the crash: a spike at 20, the fix
# approved at 35 and served at 40, one late report at 50.
REPORT_MINUTES = (0, 10, 10, 10, 20, 20, 20, 20, 20, 30, 30, 50)
FAILING = 3  # the device the fix fails on (its agent reports failed)


@dataclass
class Scenario:
    sim: FleetSim
    incident: str
    remediation: str
    rollout: str
    start: datetime

    def device(self, i: int) -> SimDevice:
        return self.sim.devices[i]


def incident_over_time(fleet) -> Scenario:
    """The fleet of these tests, built on the service's own clock (set back an hour, moved
    minute by minute), so its timeline has a shape: see ``REPORT_MINUTES``."""
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=60)
    now = [start]
    fleet.service.clock = lambda: now[0]

    def at(minute: float) -> None:
        now[0] = start + timedelta(minutes=minute)

    sim = FleetSim(fleet.service, len(REPORT_MINUTES))
    sim.enroll_all(fleet.enrollment_token)

    def report(i: int) -> None:
        dev = sim.devices[i]
        ch = fleet.service.challenge(dev.device_id)
        dev.agent_nonce = secrets.token_urlsafe(24)
        d = crash_report(dev.device_id, ch.nonce, dev.agent_nonce, crash=EXCERPT_CRASH)
        dev.report = fleet.service.accept_diagnostics(seal_bytes(d, dev.key))

    def serve() -> int:
        """Every device that reported and was not served polls once; the served apply the fix
        (and boot healthy) but for ``FAILING``, whose agent reports it failed."""
        served = 0
        for i, dev in enumerate(sim.devices):
            if dev.report is None or dev.done:
                continue
            dev.directive_id = sim.poll_once(dev)
            if dev.directive_id is None:
                continue
            dev.done, served = True, served + 1
            outcome = "failed" if i == FAILING else "applied"
            result = Result(
                device_id=dev.device_id,
                directive_id=dev.directive_id,
                outcome=outcome,
                error="simulated failure" if outcome == "failed" else None,
                boot_count_reset=outcome == "applied",
                created_at=utcnow(),
            )
            fleet.service.accept_result(seal_bytes(result, dev.key))
            if outcome == "applied":
                health = Health(
                    device_id=dev.device_id,
                    directive_id=dev.directive_id,
                    boot_id=secrets.token_hex(8),
                    created_at=utcnow(),
                )
                fleet.service.accept_health(seal_bytes(health, dev.key))
        fleet.service.tick()
        return served

    for i, minute in enumerate(REPORT_MINUTES):
        if minute < 35:
            at(minute)
            report(i)
    incident = fleet.service.incidents(fleet.viewer)[0].incident_id
    at(33)
    s = fleet.service.suggest_actions(fleet.user("oscar"), incident)
    assert s.actions, s.why
    rem = fleet.service.create_remediation(
        fleet.user("oscar"), title=s.title, actions=s.actions, incident_id=incident, required_approvals=2
    )
    ro = fleet.service.create_rollout(
        fleet.user("oscar"),
        rem.remediation_id,
        {
            "waves": [
                {"name": "canary", "devices": [sim.devices[0].device_id]},
                {"name": "all", "percent": 100},
            ],
            "halt_failure_rate": 0.5,
            "halt_min_devices": 5,
        },
    )
    at(34)
    fleet.service.approve(fleet.user("alice"), rem.remediation_id)
    at(35)
    fleet.service.approve(fleet.user("bob"), rem.remediation_id)
    at(40)
    while serve() or serve():
        pass
    at(50)
    for i, minute in enumerate(REPORT_MINUTES):
        if minute >= 35:
            report(i)
    at(52)
    while serve() or serve():
        pass
    assert all(dev.done for dev in sim.devices)
    return Scenario(sim, incident, rem.remediation_id, ro.rollout_id, start)


async def get(fleet, path: str, token: str | None) -> tuple[int, dict]:
    headers = {"Authorization": "Bearer " + token} if token else {}
    async with aiohttp.ClientSession() as s:
        async with s.get(fleet.url + "/v1/admin" + path, headers=headers) as r:
            return r.status, await r.json()


def test_bucket_sizes_are_round_and_at_most_120():
    assert bucket_size(0) == 1
    assert bucket_size(100) == 1
    assert bucket_size(3120) == 30
    assert bucket_size(3600) == 60
    assert bucket_size(90 * 86400) == 86400
    for span in (0, 1, 59, 119, 120, 3599, 86399, 86400 * 7, 86400 * 400, 86400 * 365 * 30):
        size = bucket_size(span)
        # Wherever the span starts, its buckets are at most 120.
        assert span // size + 2 <= 120, (span, size)


async def test_an_incidents_timeline_shows_the_spike_the_fix_and_the_fall(fleet):
    sc = incident_over_time(fleet)
    token = fleet.service.create_user(fleet.admin, "vic", "viewer").token
    status, t = await get(fleet, f"/incidents/{sc.incident}/timeline", token)
    assert status == 200, t
    assert t["incident_id"] == sc.incident
    assert t["start"] == sc.start.isoformat().replace("+00:00", "Z")
    assert t["bucket_s"] == 30 and len(t["buckets"]) <= 120
    assert t["reports"] == len(REPORT_MINUTES) == sum(b["reports"] for b in t["buckets"])
    per_minute = {
        round((datetime.fromisoformat(b["start"]) - sc.start).total_seconds() / 60, 1): b["reports"]
        for b in t["buckets"]
        if b["reports"]
    }
    assert per_minute == {0: 1, 10: 3, 20: 5, 30: 2, 50: 1}
    directives = fleet.store.all("SELECT outcome FROM directives")
    assert sum(b["served"] for b in t["buckets"]) == len(directives) == len(REPORT_MINUTES)
    assert sum(b["failed"] for b in t["buckets"]) == 1
    assert sum(b["succeeded"] for b in t["buckets"]) == len(REPORT_MINUTES) - 1
    assert [(m["kind"], m["subject"]) for m in t["marks"]] == [
        ("rollout", sc.rollout),
        ("approved", sc.remediation),
    ]
    # Approved when the second of the two approvals needed came, at minute 35.
    assert datetime.fromisoformat(t["marks"][1]["at"]) == sc.start + timedelta(minutes=35)


async def test_an_incidents_summary_has_the_first_reports_crash_only(fleet):
    sc = incident_over_time(fleet)
    token = fleet.service.create_user(fleet.admin, "vic", "viewer").token
    status, s = await get(fleet, f"/incidents/{sc.incident}/summary", token)
    assert status == 200, s
    assert s["first_report_id"] == sc.device(0).report.report_id
    assert s["crash"]["excerpt"] == EXCERPT
    assert s["report_count"] == len(REPORT_MINUTES) and len(s["devices"]) == len(REPORT_MINUTES)
    assert "reports" not in s


async def test_a_device_with_its_reports_directives_and_results(fleet):
    sc = incident_over_time(fleet)
    token = fleet.service.create_user(fleet.admin, "vic", "viewer").token
    dev = sc.device(FAILING)
    status, d = await get(fleet, f"/devices/{dev.device_id}", token)
    assert status == 200, d
    assert d["device_id"] == dev.device_id and d["state"] == "remediation_failed"
    assert d["recovery_test_passed_at"] is None
    assert d["reports_total"] == 1 and d["directives_total"] == 1
    [r] = d["reports"]
    assert (r["report_id"], r["incident_id"]) == (dev.report.report_id, sc.incident)
    assert r["title"] == CRASH.title
    [x] = d["directives"]
    assert (x["directive_id"], x["remediation_id"]) == (dev.directive_id, sc.remediation)
    assert x["outcome"] == "failed"
    assert x["wave"] == 1
    [res] = d["results"]
    with fleet.store.tx() as tx:  # test mode sets it when the device's recovery path passes
        tx.execute(
            "UPDATE devices SET recovery_test_passed_at = ? WHERE device_id = ?",
            "2026-11-30T12:00:00Z",
            dev.device_id,
        )
    _, again = await get(fleet, f"/devices/{dev.device_id}", token)
    assert again["recovery_test_passed_at"] == "2026-11-30T12:00:00Z"
    assert (res["directive_id"], res["outcome"]) == (dev.directive_id, "failed")
    assert res["error"] == "simulated failure"


async def test_unknown_ids_are_404_and_say_where_to_look(fleet):
    token = fleet.service.create_user(fleet.admin, "vic", "viewer").token
    for path, hint in (
        ("/devices/no-such-device", "list them with recovery-admin devices"),
        ("/incidents/INC-000000000000/timeline", "list them with recovery-admin incidents"),
        ("/incidents/INC-000000000000/summary", "list them with recovery-admin incidents"),
    ):
        status, body = await get(fleet, path, token)
        assert status == 404, (path, body)
        assert hint in body["error"], (path, body)


@SQLITE_ONLY
async def test_every_role_reads_them_and_nobody_without_a_token(fleet):
    sc = incident_over_time(fleet)
    paths = (
        f"/incidents/{sc.incident}/timeline",
        f"/incidents/{sc.incident}/summary",
        f"/devices/{sc.device(0).device_id}",
    )
    for path in paths:
        status, body = await get(fleet, path, None)
        assert status == 401, (path, body)
        status, body = await get(fleet, path, "qmr_not-a-token")
        assert status == 401, (path, body)
    for role in ("viewer", "operator", "approver", "admin"):
        token = fleet.service.create_user(fleet.admin, f"p-{role}", role).token
        for path in paths:
            status, body = await get(fleet, path, token)
            assert status == 200, (role, path, body)


async def test_a_timeline_without_reports_or_fix(fleet):
    """An incident whose reports were pruned: one empty bucket at its first sighting."""
    sim = FleetSim(fleet.service, 1)
    sim.enroll_all(fleet.enrollment_token)
    sim.crash_all()
    inc = fleet.service.incidents(fleet.viewer)[0]
    with fleet.store.tx() as tx:
        tx.execute("DELETE FROM reports")
    t = fleet.service.incident_timeline(fleet.viewer, inc.incident_id)
    assert t.reports == 0 and t.marks == [] and len(t.buckets) == 1
    assert t.start == t.end == inc.first_seen
    s = fleet.service.incident_summary(fleet.viewer, inc.incident_id)
    assert s.crash is None and s.first_report_id is None
