"""Power lost at each step of applying a directive, in one process: the agent holds at a named
step (recovery_agent.holds, the hook the QEMU lab uses to reset the machine there), the
"power cut" ends it there, and the next boot (the recovery environment again, or the OS once
boot_count was reset) picks up. The loop must converge: the fix applied exactly once, the
file never lost, quarantine and journal consistent, and the server told once (one directive,
one result at most, the healthy boot naming the directive). tests/test_faults_vm.py does the
same in QEMU."""

from __future__ import annotations

import asyncio
import json

import pytest

from recovery_agent.agent import Outcome, RecoveryAgent, report_health
from recovery_agent.bootenv import BootEnv
from recovery_agent.holds import HOLD_STEPS, HoldStep, hold_at
from recovery_agent.layout import CHANNEL_DIR, JOURNAL_DIR, LAST_DIRECTIVE, QUARANTINE_DIR
from recovery_agent.settings import AgentSettings
from recovery_lab.dirdemo import BAD, GOOD

from .conftest import enrolled_settings
from .test_agent_flow import wait_for


class PowerCut(BaseException):
    """The machine lost power: nothing in the agent may catch this."""


def cut_power_at(wanted: HoldStep):
    def hold(step: HoldStep) -> None:
        if step == wanted:
            raise PowerCut(step)

    return hold


def grub(machine) -> BootEnv:
    return BootEnv.read(machine / "esp/grub/grubenv")


async def first_visit(fleet, machine, clock, settings: AgentSettings, step: HoldStep) -> None:
    """The recovery environment's first run, approved while it waits, until the power goes."""
    run = asyncio.create_task(RecoveryAgent(settings, clock=clock, hold=cut_power_at(step)).run())
    await wait_for(lambda: fleet.service.incidents(fleet.viewer))
    fleet.approve_suggested(fleet.service.incidents(fleet.viewer)[0].incident_id)
    await clock.release()
    with pytest.raises(PowerCut):
        await asyncio.wait_for(run, 60)


@pytest.mark.parametrize("step", HOLD_STEPS)
async def test_power_loss_at_each_step_of_apply_converges(fleet, machine, clock, step: HoldStep) -> None:
    settings = await enrolled_settings(fleet, machine)
    good = {n: (machine / "os" / CHANNEL_DIR / n).read_bytes() for n in GOOD}
    bad = (machine / "os" / CHANNEL_DIR / BAD).read_bytes()
    await first_visit(fleet, machine, clock, settings, step)

    if grub(machine).boot_count >= 2:
        # GRUB starts the recovery environment again: its agent finishes what the power cut.
        lines: list[str] = []
        agent = RecoveryAgent(settings, clock=clock)
        agent.timeline.sink = lines.append
        assert await asyncio.wait_for(agent.run(), 60) is Outcome.REMEDIATED, lines
        assert any("rolled forward" in line for line in lines), lines
        assert grub(machine).boot_count == 0
    await report_health(settings, boot_id="boot-after-the-fix")

    os_root = machine / "os"
    assert not (os_root / CHANNEL_DIR / BAD).exists()
    assert {n: (os_root / CHANNEL_DIR / n).read_bytes() for n in GOOD} == good
    [qdir] = (os_root / QUARANTINE_DIR).iterdir()
    assert (qdir / f"0-{BAD}").read_bytes() == bad, "the file is never lost"
    manifest = json.loads((qdir / "manifest.json").read_text())
    assert [e["original_path"] for e in manifest["entries"]] == [f"{CHANNEL_DIR}/{BAD}"]
    [journal] = (os_root / JOURNAL_DIR).glob("*.json")
    assert json.loads(journal.read_text())["state"] == "applied"
    assert journal.stem == qdir.name
    assert not (os_root / LAST_DIRECTIVE).exists(), "the healthy boot confirmed it"

    [directive] = fleet.store.all("SELECT directive_id, outcome FROM directives")
    assert directive["directive_id"] == qdir.name, "one directive, the one applied"
    assert directive["outcome"] == "succeeded", "the healthy boot named the directive"
    results = fleet.service.device_results(fleet.viewer, "dev-0001")
    assert [r.outcome for r in results] in (["applied"], []), "the result recorded once at most"
    assert fleet.count("reports") == 1, "no second report of a crash the fix already removed"
    assert fleet.service.devices(fleet.viewer)[0].state == "healthy"


def test_a_hold_says_its_marker_and_waits_only_at_its_step() -> None:
    said: list[str] = []
    slept: list[float] = []
    hold = hold_at("moved", said.append, slept.append)
    hold("journal")
    assert said == [] and slept == []
    hold("moved")
    assert said[0].startswith("QMR-HOLD moved:") and len(slept) == 1
