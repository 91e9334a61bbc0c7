"""When the agent itself cannot go on: a grubenv it cannot count in, a bug in its own code. It
still tells the server, and always exits with one of its documented codes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from recovery_agent import agent as agent_module
from recovery_agent import cli
from recovery_agent.agent import Outcome, RecoveryAgent, report_health
from recovery_agent.bootenv import ENVBLK_SIZE, BootEnv, BootEnvError
from recovery_agent.protocol.wire import CrashKind, Diagnostics

from .conftest import enrolled_settings

GRUBENV = "esp/grub/grubenv"


def reports(fleet) -> list[Diagnostics]:
    return [
        r.diagnostics
        for i in fleet.service.incidents(fleet.viewer)
        for r in fleet.service.incident(fleet.viewer, i.incident_id).reports
    ]


async def settings_for(fleet, machine: Path, **overrides):
    return await enrolled_settings(fleet, machine, auto_remediation=False, long_poll_s=0.1, **overrides)


def full_grubenv(machine: Path) -> bytes:
    """A grubenv with no room left for a new variable (recovery_attempts)."""
    env = BootEnv.read(machine / GRUBENV)
    env.set("boot_count", "2")
    room = ENVBLK_SIZE - len(env.to_bytes().rstrip(b"#"))
    env.set("saved_entry", "x" * (room - len("saved_entry=\n")))
    data = env.to_bytes()
    assert data.endswith(b"\n")  # not one '#' of padding left
    (machine / GRUBENV).write_bytes(data)
    return data


# --------------------------------------------------------------------------- grubenv


async def test_a_full_grubenv_is_reported_and_the_machine_waits_for_a_person(fleet, machine, clock) -> None:
    before = full_grubenv(machine)
    settings = await settings_for(fleet, machine)
    await clock.release()
    assert await RecoveryAgent(settings, clock=clock).run() is Outcome.NEEDS_MANUAL
    assert (machine / GRUBENV).read_bytes() == before  # nothing half-written
    [diagnostics] = reports(fleet)
    assert diagnostics.crash.title == "general protection fault in sensor_parse_channel"
    assert diagnostics.boot.recovery_attempts == diagnostics.boot.max_recovery_attempts
    assert any("recovery_attempts could not be saved in grubenv" in n for n in diagnostics.notes)
    assert fleet.service.devices(fleet.viewer)[0].state == "needs_manual"


async def test_a_full_grubenv_still_lets_a_fix_reboot_into_the_os(fleet, machine, clock) -> None:
    full_grubenv(machine)
    settings = await enrolled_settings(fleet, machine)
    run = asyncio.create_task(RecoveryAgent(settings, clock=clock).run())
    while not fleet.service.incidents(fleet.viewer):
        await asyncio.sleep(0.05)
    fleet.approve_suggested(fleet.service.incidents(fleet.viewer)[0].incident_id)
    await clock.release()
    assert await asyncio.wait_for(run, 60) is Outcome.REMEDIATED
    assert BootEnv.read(machine / GRUBENV).boot_count == 0
    # The OS's health check resets the counters without needing room for a new one.
    await report_health(settings, boot_id="boot-3")
    assert BootEnv.read(machine / GRUBENV).boot_count == 0


@pytest.mark.parametrize(
    "garbage",
    [b"\x00" * ENVBLK_SIZE, b"# GRUB Environment Block\nno equals sign\n".ljust(ENVBLK_SIZE, b"#")],
    ids=["zeros", "malformed-line"],
)
async def test_a_damaged_grubenv_is_rewritten_fresh_and_the_visit_counted(
    fleet, machine, clock, garbage: bytes
) -> None:
    """GRUB cannot read a damaged block either, so it would start recovery for ever: the agent
    writes a fresh one in its place, counts its visit there and reports as usual."""
    (machine / GRUBENV).write_bytes(garbage)
    settings = await settings_for(fleet, machine)
    await clock.release()
    assert await RecoveryAgent(settings, clock=clock).run() is Outcome.NO_REMEDIATION
    env = BootEnv.read(machine / GRUBENV)
    assert (env.boot_count, env.recovery_attempts) == (0, 1)
    [diagnostics] = reports(fleet)
    assert diagnostics.boot.boot_count == 0 and diagnostics.boot.recovery_attempts == 1
    assert any(n.startswith("grubenv was damaged") for n in diagnostics.notes)


async def test_a_grubenv_that_cannot_be_rewritten_is_reported_and_left_alone(fleet, machine, clock) -> None:
    garbage = b"short"  # not one block: it cannot be rewritten in place
    (machine / GRUBENV).write_bytes(garbage)
    settings = await settings_for(fleet, machine)
    await clock.release()
    assert await RecoveryAgent(settings, clock=clock).run() is Outcome.NEEDS_MANUAL
    assert (machine / GRUBENV).read_bytes() == garbage
    [diagnostics] = reports(fleet)
    assert diagnostics.crash.kind is CrashKind.KERNEL_PANIC
    assert diagnostics.boot.boot_count == settings.boot_limit
    assert any(n.startswith("grubenv cannot be read") for n in diagnostics.notes)


async def test_cloud_off_with_a_grubenv_that_cannot_be_read_stays(fleet, machine) -> None:
    (machine / GRUBENV).write_bytes(b"short")
    settings = await settings_for(fleet, machine, cloud_remediation=False)
    assert await RecoveryAgent(settings).run() is Outcome.NEEDS_MANUAL  # could not reset boot_count
    assert fleet.count("reports") == 0


# --------------------------------------------------------------------------- the agent's own failures


async def test_an_unexpected_exception_is_reported_as_an_agent_error(
    fleet, machine, clock, monkeypatch
) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the inventory")

    monkeypatch.setattr(agent_module.inventory, "collect", broken)
    settings = await settings_for(fleet, machine)
    await clock.release()
    assert await RecoveryAgent(settings, clock=clock).run() is Outcome.ERROR
    # The attempt was counted, and the server was told: nothing burnt silently.
    assert BootEnv.read(machine / GRUBENV).get("recovery_attempts") == "1"
    [diagnostics] = reports(fleet)
    assert diagnostics.crash.kind is CrashKind.AGENT_ERROR
    assert diagnostics.crash.title == "agent error: RuntimeError in agent.py:collect"
    assert "a bug in the inventory" in diagnostics.crash.excerpt
    assert diagnostics.boot.recovery_attempts == 1
    assert [d.recovery_attempts for d in fleet.service.devices(fleet.viewer)] == [1]
    [incident] = fleet.service.incidents(fleet.viewer)
    assert incident.kind == "agent_error"


async def test_a_failure_while_reporting_is_reported_too(fleet, machine, clock, monkeypatch) -> None:
    real = agent_module.seal_within
    calls = []

    def fails_once(diagnostics, key, *args):
        calls.append(diagnostics.crash.kind)
        if len(calls) == 1:
            raise UnicodeEncodeError("utf-8", "x", 0, 1, "surrogates not allowed")
        return real(diagnostics, key, *args)

    monkeypatch.setattr(agent_module, "seal_within", fails_once)
    settings = await settings_for(fleet, machine)
    await clock.release()
    assert await RecoveryAgent(settings, clock=clock).run() is Outcome.ERROR
    assert calls == [CrashKind.KERNEL_PANIC, CrashKind.AGENT_ERROR]
    [diagnostics] = reports(fleet)
    assert diagnostics.crash.title == "agent error: UnicodeEncodeError in agent.py:report"


async def test_a_fix_applied_but_boot_count_not_reset_waits_for_a_person(
    fleet, machine, clock, monkeypatch
) -> None:
    def cannot(self, path):
        raise BootEnvError(f"grubenv at {path} is read-only")

    settings = await enrolled_settings(fleet, machine)
    monkeypatch.setattr(BootEnv, "reset_boot_count", cannot)
    run = asyncio.create_task(RecoveryAgent(settings, clock=clock).run())
    while not fleet.service.incidents(fleet.viewer):
        await asyncio.sleep(0.05)
    fleet.approve_suggested(fleet.service.incidents(fleet.viewer)[0].incident_id)
    await clock.release()
    assert await asyncio.wait_for(run, 60) is Outcome.NEEDS_MANUAL
    [result] = fleet.service.device_results(fleet.viewer, "dev-0001")
    assert result.outcome == "applied"


# --------------------------------------------------------------------------- the command line


def test_run_exits_with_a_documented_code_whatever_fails(tmp_path: Path, monkeypatch, capsys) -> None:
    class Exploding:
        def __init__(self, *args, **kwargs):
            raise ValueError("not an AgentError")

    monkeypatch.setattr(cli, "RecoveryAgent", Exploding)
    monkeypatch.setattr(cli.AgentSettings, "load", classmethod(lambda cls, path: object()))
    assert cli.main(["--config", str(tmp_path / "agent.json"), "run"]) == int(Outcome.ERROR)
    assert "not an AgentError" in capsys.readouterr().err
