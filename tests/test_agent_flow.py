"""The whole recovery loop in one process: the real agent against the real server over HTTP
on 127.0.0.1, on a directory laid out like the broken machine's disks."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import UTC, datetime, timedelta

from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

from recovery_agent.agent import Outcome, RecoveryAgent, report_health
from recovery_agent.bootenv import BootEnv
from recovery_agent.layout import CHANNEL_DIR as CHANNELS
from recovery_agent.layout import CONFIRMED_DIRECTIVE, LAST_DIRECTIVE, PSTORE_ARCHIVE, STATE_DIR
from recovery_agent.protocol.keys import SigningKey
from recovery_lab.dirdemo import BAD, GOOD

from .clock import ManualClock
from .conftest import enrolled_settings, tree_snapshot


async def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def grub(machine) -> BootEnv:
    return BootEnv.read(machine / "esp/grub/grubenv")


async def test_channel_file_incident_is_recovered_after_approval(fleet, machine, clock):
    settings = await enrolled_settings(fleet, machine)
    good = {n: (machine / "os" / CHANNELS / n).read_bytes() for n in GOOD}
    run = asyncio.create_task(RecoveryAgent(settings, clock=clock).run())
    await wait_for(lambda: fleet.service.incidents(fleet.viewer))
    incident = fleet.service.incidents(fleet.viewer)[0]
    assert incident.title == "general protection fault in sensor_parse_channel"
    assert incident.channel_file == f"{CHANNELS}/{BAD}"
    fleet.approve_suggested(incident.incident_id)
    await clock.release()
    assert await asyncio.wait_for(run, 60) is Outcome.REMEDIATED

    os_root = machine / "os"
    assert not (os_root / CHANNELS / BAD).exists()
    assert {n: (os_root / CHANNELS / n).read_bytes() for n in GOOD} == good
    [qdir] = (os_root / "var/lib/recovery/quarantine").iterdir()
    manifest = json.loads((qdir / "manifest.json").read_text())
    assert BAD in json.dumps(manifest)
    assert grub(machine).boot_count == 0
    [result] = fleet.service.device_results(fleet.viewer, "dev-0001")
    assert result.outcome == "applied"

    directive_id = (os_root / LAST_DIRECTIVE).read_text().strip()
    assert directive_id == result.directive_id

    await report_health(settings, boot_id="boot-3")
    assert fleet.service.devices(fleet.viewer)[0].state == "healthy"
    assert not (os_root / LAST_DIRECTIVE).exists()
    assert (os_root / CONFIRMED_DIRECTIVE).read_text().strip() == directive_id
    assert not list((machine / "pstore").iterdir()), "the good boot archives the crash records"
    assert list((os_root / "var/lib/recovery/pstore").glob("*/dmesg-ramoops-0"))
    assert grub(machine).get("recovery_attempts") == "0"


async def test_altered_directive_is_rejected_inside_and_nothing_changes(fleet, machine, clock):
    """A proxy between agent and server rewrites the directive's action path."""

    async def proxy(request: web.Request) -> web.Response:
        async with ClientSession() as s:
            async with s.request(
                request.method,
                fleet.url + request.path_qs,
                headers={
                    k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")
                },
                data=await request.read(),
            ) as r:
                body = await r.read()
                if request.path.endswith("/directive") and r.status == 200:
                    answer = json.loads(body)
                    if answer["status"] == "directive":
                        env = answer["envelope"]
                        payload = json.loads(base64.b64decode(env["payload"]))
                        payload["actions"][0]["path"] = f"{CHANNELS}/{GOOD[0]}"
                        env["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
                        body = json.dumps(answer).encode()
                return web.Response(body=body, status=r.status, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy)
    mitm = TestServer(app, host="127.0.0.1")
    await mitm.start_server()
    try:
        settings = await enrolled_settings(
            fleet, machine, server_url=f"http://127.0.0.1:{mitm.port}", time_to_reboot_min=40
        )
        before = tree_snapshot(machine / "os")
        run = asyncio.create_task(RecoveryAgent(settings, clock=clock).run())
        await wait_for(lambda: fleet.service.incidents(fleet.viewer))
        fleet.approve_suggested(fleet.service.incidents(fleet.viewer)[0].incident_id)
        await clock.release()
        assert await asyncio.wait_for(run, 60) is Outcome.NO_REMEDIATION
    finally:
        await mitm.close()
    assert tree_snapshot(machine / "os") == before
    assert fleet.service.device_results(fleet.viewer, "dev-0001") == []


async def test_expired_directive_is_rejected(fleet, machine):
    settings = await enrolled_settings(fleet, machine, time_to_reboot_min=30)
    before = tree_snapshot(machine / "os")
    # The device's clock is two hours ahead; the directive lives one hour.
    clock = ManualClock(wall_start=datetime.now(UTC) + timedelta(hours=2))
    agent = RecoveryAgent(settings, clock=clock)
    lines: list[str] = []
    agent.timeline.sink = lines.append
    run = asyncio.create_task(agent.run())
    await wait_for(lambda: fleet.service.incidents(fleet.viewer))
    fleet.approve_suggested(fleet.service.incidents(fleet.viewer)[0].incident_id)
    await clock.release()
    assert await asyncio.wait_for(run, 60) is Outcome.NO_REMEDIATION
    assert any("REJECTED" in line and "expired" in line for line in lines)
    assert tree_snapshot(machine / "os") == before


async def test_directive_signed_by_another_key_is_rejected(fleet, machine, clock):
    """A server key the device did not pin (a compromised or impostor server)."""
    settings = await enrolled_settings(fleet, machine, time_to_reboot_min=30)
    agent = RecoveryAgent(settings, clock=clock)
    impostor = SigningKey.generate()
    agent.server_keyring = {impostor.key_id: impostor.public}
    lines: list[str] = []
    agent.timeline.sink = lines.append
    before = tree_snapshot(machine / "os")
    run = asyncio.create_task(agent.run())
    await wait_for(lambda: fleet.service.incidents(fleet.viewer))
    fleet.approve_suggested(fleet.service.incidents(fleet.viewer)[0].incident_id)
    await clock.release()
    assert await asyncio.wait_for(run, 60) is Outcome.NO_REMEDIATION
    assert any("no signature by a trusted key" in line for line in lines)
    assert tree_snapshot(machine / "os") == before


async def test_unknown_crash_retries_then_asks_for_a_person(fleet, tmp_path, clock):
    from recovery_lab.dirdemo import make_machine_dir

    machine = make_machine_dir(tmp_path / "m", bad_channel_file=False, panic_log=None)
    settings = await enrolled_settings(
        fleet, machine, time_to_reboot_min=20, retry_interval_min=4, max_recovery_attempts=2
    )
    await clock.release()  # no fix will come: let the agent's time run out
    agent = RecoveryAgent(settings, clock=clock)
    assert await asyncio.wait_for(agent.run(), 60) is Outcome.NO_REMEDIATION
    assert grub(machine).boot_count == 0, "the OS gets another try"
    assert grub(machine).get("recovery_attempts") == "1"
    incident = fleet.service.incidents(fleet.viewer)[0]
    assert incident.kind == "unknown"

    BootEnv.read(machine / "esp/grub/grubenv")  # the OS failed twice again:
    env = grub(machine)
    env.set("boot_count", "2")
    env.write(machine / "esp/grub/grubenv")
    agent2 = RecoveryAgent(settings, clock=clock)
    assert await asyncio.wait_for(agent2.run(), 60) is Outcome.NEEDS_MANUAL
    assert grub(machine).boot_count == 2, "stays in recovery rather than loop"
    device = fleet.service.devices(fleet.viewer)[0]
    assert device.state == "needs_manual"
    assert any(e.kind == "device.needs_manual" for e in fleet.service.events(fleet.viewer))


async def test_cloud_remediation_off_sends_nothing(fleet, machine):
    settings = await enrolled_settings(fleet, machine, cloud_remediation=False)
    assert await RecoveryAgent(settings).run() is Outcome.CLOUD_DISABLED
    assert fleet.count("reports") == 0
    assert grub(machine).boot_count == 0


async def test_server_restart_while_the_agent_waits(fleet, machine, clock):
    settings = await enrolled_settings(fleet, machine)
    run = asyncio.create_task(RecoveryAgent(settings, clock=clock).run())
    await wait_for(lambda: fleet.service.incidents(fleet.viewer))
    incident_id = fleet.service.incidents(fleet.viewer)[0].incident_id
    await fleet.restart()
    fleet.approve_suggested(incident_id)
    await clock.release()
    assert await asyncio.wait_for(run, 60) is Outcome.REMEDIATED
    assert not (machine / "os" / CHANNELS / BAD).exists()


async def test_agent_waits_for_a_late_server(fleet, machine, clock):
    """The recovery environment often comes up before the network or the server."""
    settings = await enrolled_settings(fleet, machine, time_to_reboot_min=500)
    await fleet.stop()
    run = asyncio.create_task(RecoveryAgent(settings, clock=clock).run())
    await asyncio.sleep(1.0)
    await fleet.start()
    await wait_for(lambda: fleet.service.incidents(fleet.viewer), timeout=20)
    fleet.approve_suggested(fleet.service.incidents(fleet.viewer)[0].incident_id)
    await clock.release()
    assert await asyncio.wait_for(run, 60) is Outcome.REMEDIATED


async def test_planted_symlinks_in_the_agent_state_are_not_followed(fleet, machine, clock, tmp_path):
    """A symlink at last-directive's temp name (recovery environment) and at the pstore archive
    (the OS's health step): the fix is applied and the good boot reported, and nothing outside
    the OS root changes."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me\n")
    state_dir = machine / "os" / STATE_DIR
    state_dir.mkdir(parents=True)
    (state_dir / ".last-directive.tmp").symlink_to(outside / "precious")
    (machine / "os" / PSTORE_ARCHIVE).symlink_to(outside)
    before = tree_snapshot(outside)

    settings = await enrolled_settings(fleet, machine)
    agent = RecoveryAgent(settings, clock=clock)
    lines: list[str] = []
    agent.timeline.sink = lines.append
    run = asyncio.create_task(agent.run())
    await wait_for(lambda: fleet.service.incidents(fleet.viewer))
    fleet.approve_suggested(fleet.service.incidents(fleet.viewer)[0].incident_id)
    await clock.release()
    assert await asyncio.wait_for(run, 60) is Outcome.REMEDIATED
    assert any(f"could not record {LAST_DIRECTIVE}" in line and "symlink" in line for line in lines)
    assert not (machine / "os" / LAST_DIRECTIVE).exists()

    await report_health(settings, boot_id="boot-3")
    assert fleet.service.devices(fleet.viewer)[0].state == "healthy"
    assert list((machine / "pstore").iterdir()), "records stay in pstore when they cannot be archived"
    assert tree_snapshot(outside) == before
