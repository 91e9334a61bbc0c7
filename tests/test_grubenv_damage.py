"""A damaged grubenv on the ESP, in one process (docs/boot-counting.md, "When grubenv is
damaged"): GRUB cannot count and chooses recovery; the agent writes a fresh block in place and
goes on with what the crash records say. tests/test_faults_vm.py does it with GRUB in QEMU."""

from __future__ import annotations

import asyncio
import os

from recovery_agent.agent import Outcome, RecoveryAgent
from recovery_agent.bootenv import ENVBLK_SIZE, BootEnv
from recovery_lab.dirdemo import make_machine_dir

from .conftest import enrolled_settings
from .test_agent_flow import wait_for


def damage(machine) -> None:
    path = machine / "esp/grub/grubenv"
    inode = path.stat().st_ino
    with open(path, "r+b") as f:
        f.write(os.urandom(ENVBLK_SIZE).replace(b"#", b"x"))
    assert path.stat().st_ino == inode


async def test_with_crash_records_the_fix_is_applied_and_grubenv_is_whole_again(fleet, machine, clock):
    damage(machine)
    inode = (machine / "esp/grub/grubenv").stat().st_ino
    settings = await enrolled_settings(fleet, machine)
    agent = RecoveryAgent(settings, clock=clock)
    lines: list[str] = []
    agent.timeline.sink = lines.append
    run = asyncio.create_task(agent.run())
    await wait_for(lambda: fleet.service.incidents(fleet.viewer))
    incident = fleet.service.incidents(fleet.viewer)[0]
    assert incident.title == "general protection fault in sensor_parse_channel"
    fleet.approve_suggested(incident.incident_id)
    await clock.release()
    assert await asyncio.wait_for(run, 60) is Outcome.REMEDIATED
    assert any("wrote a fresh block in its place" in line for line in lines), lines
    env = BootEnv.read(machine / "esp/grub/grubenv")
    assert env.boot_count == 0 and env.boot_limit == 2 and env.recovery_attempts == 1
    assert (machine / "esp/grub/grubenv").stat().st_ino == inode, "rewritten in place, never recreated"


async def test_without_crash_records_the_os_gets_its_tries_again(fleet, tmp_path, clock):
    machine = make_machine_dir(tmp_path / "m", bad_channel_file=False, panic_log=None)
    damage(machine)
    settings = await enrolled_settings(fleet, machine, time_to_reboot_min=10)
    await clock.release()
    assert await asyncio.wait_for(RecoveryAgent(settings, clock=clock).run(), 60) is Outcome.NO_REMEDIATION
    env = BootEnv.read(machine / "esp/grub/grubenv")
    assert env.boot_count == 0 and env.boot_limit == 2
    [incident] = fleet.service.incidents(fleet.viewer)
    assert incident.kind == "none", "GRUB counted no failed boot and nothing crashed"
