"""The API against its own OpenAPI document (schemathesis, as a separate process, against the
live server with data in it, with valid and invalid data), and /metrics in Prometheus' text
format."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import aiohttp
import pytest

from .fleetsim import FleetSim
from .test_hostile_input import every_view_answers

SQLITE_ONLY = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)


def populate(fleet) -> dict:
    """A few devices with an incident, a remediation waiting for approval, and a rollout."""
    sim = FleetSim(fleet.service, 6)
    sim.enroll_all(fleet.enrollment_token)
    sim.crash_all()
    inc = fleet.service.incidents(fleet.viewer)[0].incident_id
    s = fleet.service.suggest_actions(fleet.user("oscar"), inc)
    rem = fleet.service.create_remediation(
        fleet.user("oscar"),
        title="quarantine 291",
        actions=[{"type": "quarantine_file", "path": "var/lib/x", "sha256": "a" * 64}]
        if not s.actions
        else s.actions,
        incident_id=inc,
    )
    ro = fleet.service.create_rollout(
        fleet.user("oscar"),
        rem.remediation_id,
        {
            "waves": [
                {"name": "canary", "devices": [sim.devices[0].device_id]},
                {"name": "all", "percent": 100},
            ]
        },
    )
    return {"incident": inc, "remediation": rem.remediation_id, "rollout": ro.rollout_id, "sim": sim}


@SQLITE_ONLY
@pytest.mark.timeout(300)
async def test_api_conforms_to_its_openapi_document(fleet, tmp_path):
    ids = populate(fleet)
    token = fleet.service.create_user(fleet.admin, "schemathesis", "admin").token
    config = tmp_path / "schemathesis.toml"
    # Real identifiers, so the fuzzer reaches past 404s into the handlers.
    config.write_text(f"""
[parameters]
incident_id = "{ids["incident"]}"
remediation_id = "{ids["remediation"]}"
rollout_id = "{ids["rollout"]}"
report_id = "{ids["sim"].devices[1].report.report_id}"
device_id = "{ids["sim"].devices[5].device_id}"
token_id = "{fleet.service.enrollment_tokens(fleet.admin)[0].token_id}"
""")
    cmd = [
        str(Path(sys.executable).parent / "schemathesis"),
        "--config-file",
        str(config),
        "run",
        f"{fleet.url}/openapi.json",
        "-H",
        f"Authorization: Bearer {token}",
        # Every check but positive_data_acceptance: a schema cannot say "base64 of a JSON
        # document signed by an enrolled key", so valid-looking envelopes are rightly refused.
        # Valid and invalid data both (negative: wrong types, values out of range, missing
        # fields), strings with NUL bytes included.
        "--mode",
        "all",
        "--generation-allow-x00",
        "true",
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--max-examples",
        "40",
        "--workers",
        "1",
        "--seed",
        "291",
        "--no-color",
    ]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 280)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-6000:]
    assert re.search(r"\d+ generated, \d+ passed", text), text[-2000:]
    # Whatever the fuzzer stored, every read view still answers.
    await every_view_answers(fleet, token)


@SQLITE_ONLY
async def test_openapi_document_describes_every_route(fleet):
    from recovery_server.app import ROUTES

    async with aiohttp.ClientSession() as s:
        async with s.get(fleet.url + "/openapi.json") as r:
            doc = await r.json()
    assert doc["openapi"].startswith("3.")
    described = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert described == {(r.method, r.path) for r in ROUTES if not r.hidden}
    assert {"Envelope", "DirectivePoll", "RolloutPlan", "Error"} <= set(doc["components"]["schemas"])
    assert doc["paths"]["/v1/admin/devices"]["get"]["security"] == [{"adminToken": []}]


_SAMPLE = re.compile(
    r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*",?)*\})? -?[0-9.e+]+$|'
    r"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{.*\})? \+Inf$"
)


@SQLITE_ONLY
async def test_metrics_in_prometheus_text_format(fleet):
    ids = populate(fleet)
    fleet.service.approve(fleet.user("bob"), ids["remediation"])
    ids["sim"].run(lambda wave: 0.0)
    viewer = {"Authorization": "Bearer " + fleet.service.create_user(fleet.admin, "prom", "viewer").token}
    async with aiohttp.ClientSession() as s:
        async with s.get(fleet.url + "/v1/admin/devices") as r:
            assert r.status == 401
        async with s.get(fleet.url + "/metrics") as r:
            assert r.status == 401, "metrics take a person's token by default"
        async with s.get(fleet.url + "/metrics", headers=viewer) as r:
            assert r.status == 200 and r.content_type == "text/plain"
            text = await r.text()
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) qmr_[a-z_]+ ", line), line
            continue
        assert _SAMPLE.match(line), line
        name_labels, value = line.rsplit(" ", 1)
        samples[name_labels] = float(value)
    assert samples['qmr_devices{state="healthy"}'] == 6
    assert samples["qmr_reports_total"] == 6
    assert samples['qmr_directives_total{outcome="succeeded"}'] == 6
    assert samples[f'qmr_rollout_wave{{rollout="{ids["rollout"]}",state="completed"}}'] == 1
    assert samples['qmr_http_requests_total{method="GET",route="/v1/admin/devices",status="401"}'] == 1
    assert samples['qmr_http_requests_total{method="GET",route="/metrics",status="401"}'] == 1
    assert any(k.startswith("qmr_http_request_duration_seconds_bucket") for k in samples)
    # The store's and the group commit's counters are this process's own.
    assert samples["qmr_store_transactions_total"] == fleet.store.transactions > 0
    assert samples["qmr_store_write_lock_wait_seconds_total"] >= 0
    stats = fleet.service.commits.stats
    assert samples["qmr_report_commits_total"] == stats.batches
    assert samples["qmr_reports_committed_total"] == stats.writes
    assert json.dumps(samples)  # all values are plain numbers


@SQLITE_ONLY
@pytest.mark.parametrize("access, anonymous, described", [("public", 200, True), ("off", 404, False)])
async def test_metrics_can_be_public_or_off(store_url, tmp_path, access, anonymous, described):
    from recovery_agent.protocol.keys import SigningKey
    from recovery_server.app import make_app

    from .conftest import Fleet, RecoveryTestServer

    fleet = Fleet(store_url=store_url, key=SigningKey.generate())
    await fleet.start()
    await fleet.server.close()
    fleet.server = RecoveryTestServer(make_app(fleet.service, metrics_access=access), host="127.0.0.1")
    await fleet.server.start_server()
    fleet.port = fleet.server.port
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(fleet.url + "/metrics") as r:
                assert r.status == anonymous
                if access == "off":
                    assert "--metrics token" in (await r.json())["error"]
            async with s.get(fleet.url + "/openapi.json") as r:
                doc = await r.json()
        assert ("/metrics" in doc["paths"]) == described
        if described:
            assert "security" not in doc["paths"]["/metrics"]["get"]
    finally:
        await fleet.stop()
