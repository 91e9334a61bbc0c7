"""The admin API's reads stay bounded whatever the fleet's size: an incident names the first of
its devices and counts them all, its reports come a page at a time (with where the next page
starts), and the devices and the audit log are lists asked for a page at a time, which the
admin client walks to the end. Over HTTP, on both stores.

(A fleet-sized incident once answered with every report's diagnostics: 887 MB and 26 s for
100,000 devices, with every device's request waiting meanwhile: scripts/bench_admin.py.)"""

from __future__ import annotations

import secrets

import aiohttp
import pytest

from recovery_agent.protocol.admin import INCIDENT_DEVICES_SHOWN, LIST_PAGE_MAX, AdminClient
from recovery_agent.protocol.client import ServerRefused
from recovery_agent.protocol.envelope import seal_bytes

from .conftest import FAST_RETRY
from .fleetsim import FleetSim, crash_report

# More devices than an incident names, so that its list is cut and its count is not.
DEVICES = INCIDENT_DEVICES_SHOWN + 7


def crashed_fleet(fleet, n: int = DEVICES) -> tuple[FleetSim, str]:
    """``n`` devices, each of which reported the same crash once (through the service): the
    simulation and the incident's id."""
    sim = FleetSim(fleet.service, n)
    sim.enroll_all(fleet.enrollment_token)
    receipt = None
    for dev in sim.devices:
        dev.agent_nonce = secrets.token_urlsafe(24)
        d = crash_report(dev.device_id, fleet.service.challenge(dev.device_id).nonce, dev.agent_nonce)
        receipt = dev.report = fleet.service.accept_diagnostics(seal_bytes(d, dev.key))
    assert receipt is not None
    return sim, receipt.incident_id


def operator(fleet) -> AdminClient:
    token = fleet.service.create_user(fleet.admin, "olga", "operator").token
    return AdminClient(fleet.url, token, retry=FAST_RETRY)


async def test_an_incident_names_its_first_devices_and_counts_them_all(fleet):
    sim, incident_id = crashed_fleet(fleet)
    everyone = sorted(d.device_id for d in sim.devices)
    async with operator(fleet) as c:
        [listed] = await c.incidents()
        summary = await c.incident_summary(incident_id)
        detail = await c.incident(incident_id)
    for view in (listed, summary, detail):
        assert view.devices == everyone[:INCIDENT_DEVICES_SHOWN]
        assert view.devices_total == DEVICES
        assert view.report_count == DEVICES


async def test_an_incidents_reports_come_a_page_at_a_time_each_once_in_order(fleet):
    sim, incident_id = crashed_fleet(fleet)
    async with operator(fleet) as c:
        pages, after = [], None
        while True:
            page = await c.incident(incident_id, limit=40, after=after)
            pages.append(page)
            assert page.reports_total == DEVICES
            if page.next_after is None:
                break
            assert page.next_after == page.reports[-1].report_id
            after = page.next_after
        one_page = await c.incident(incident_id, limit=DEVICES)
    assert [len(p.reports) for p in pages] == [40, 40, DEVICES - 80]
    seen = [r.report_id for p in pages for r in p.reports]
    # Oldest first, each report once: the same order as one page of them all.
    assert seen == [r.report_id for r in one_page.reports]
    assert sorted(seen) == sorted(d.report.report_id for d in sim.devices)
    assert one_page.next_after is None
    # Each report carries its diagnostics, signed by the device that sent it.
    by_id = {d.report.report_id: d.device_id for d in sim.devices}
    assert all(r.diagnostics.device_id == by_id[r.report_id] == r.device_id for p in pages for r in p.reports)


async def test_an_incident_page_refuses_a_bad_cursor_or_limit_and_says_why(fleet):
    _, incident_id = crashed_fleet(fleet, 3)
    async with operator(fleet) as c:
        with pytest.raises(ServerRefused, match="after: no report 'rpt-nope'.*start again without after="):
            await c.incident(incident_id, after="rpt-nope")
        with pytest.raises(ServerRefused, match="no incident INC-000000000000"):
            await c.incident("INC-000000000000")
        token = fleet.service.create_user(fleet.admin, "pat", "viewer").token
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as s:
        for bad in ("0.5", "-1", "ten", "1e3"):
            url = f"{fleet.url}/v1/admin/incidents/{incident_id}?limit={bad}"
            async with s.get(url, headers=headers) as r:
                assert r.status == 400
                assert "limit must be a whole number" in (await r.json())["error"]
        # Too many is taken as the most a page gives, not refused.
        async with s.get(f"{fleet.url}/v1/admin/devices?limit={LIST_PAGE_MAX * 10}", headers=headers) as r:
            assert r.status == 200 and len(await r.json()) == 3


async def test_the_devices_and_the_audit_log_are_read_a_page_at_a_time_and_walked_whole(fleet):
    sim, _ = crashed_fleet(fleet, 25)
    everyone = sorted(d.device_id for d in sim.devices)
    token = fleet.service.create_user(fleet.admin, "pat", "viewer").token
    async with aiohttp.ClientSession() as s:
        headers = {"Authorization": f"Bearer {token}"}
        async with s.get(f"{fleet.url}/v1/admin/devices?limit=10", headers=headers) as r:
            first = [d["device_id"] for d in await r.json()]
        async with s.get(f"{fleet.url}/v1/admin/devices?limit=10&after={first[-1]}", headers=headers) as r:
            second = [d["device_id"] for d in await r.json()]
    assert first + second == everyone[:20]
    async with AdminClient(fleet.url, token, retry=FAST_RETRY) as c:
        assert [d.device_id for d in await c.devices(page=7)] == everyone
        every_entry = await c.events(page=LIST_PAGE_MAX)
        assert [e.seq for e in await c.events(page=9)] == [e.seq for e in every_entry]
        assert len(every_entry) > 2 * 25  # each device's enrollment and report, and more
        after = every_entry[10].seq
        assert [e.seq for e in await c.events(after=after, page=4)] == [e.seq for e in every_entry[11:]]
        mine = await c.events(device=everyone[3], page=1)
        assert mine and {e.device_id for e in mine} == {everyone[3]}
