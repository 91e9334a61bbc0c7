"""An OS partition with no space left, in one process: the apply is refused before anything
changes, the refusal reaches the server, and on its last attempt the agent stops for a person
instead of rebooting into recovery forever. tests/test_faults_vm.py fills a real ext4 in QEMU."""

from __future__ import annotations

import asyncio
import errno

import pytest

from recovery_agent import remediate
from recovery_agent.agent import Outcome, RecoveryAgent
from recovery_agent.bootenv import BootEnv
from recovery_agent.errors import RemediationError

from .conftest import enrolled_settings, tree_snapshot
from .test_agent_flow import wait_for


@pytest.fixture
def full_disk(monkeypatch):
    """Every journal write fails as on a full ext4 (ENOSPC)."""

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(remediate, "write_journal", no_space)


@pytest.mark.parametrize(("attempt", "outcome"), [(1, Outcome.REMEDIATION_FAILED), (2, Outcome.NEEDS_MANUAL)])
async def test_a_full_os_partition_refuses_the_fix_cleanly_and_reports_it(
    fleet, machine, clock, full_disk, attempt: int, outcome: Outcome
) -> None:
    settings = await enrolled_settings(fleet, machine, max_recovery_attempts=2)
    env = BootEnv.read(machine / "esp/grub/grubenv")
    env.set("recovery_attempts", str(attempt - 1))
    env.write(machine / "esp/grub/grubenv")
    before = tree_snapshot(machine / "os")
    agent = RecoveryAgent(settings, clock=clock)
    lines: list[str] = []
    agent.timeline.sink = lines.append
    run = asyncio.create_task(agent.run())
    await wait_for(lambda: fleet.service.incidents(fleet.viewer))
    fleet.approve_suggested(fleet.service.incidents(fleet.viewer)[0].incident_id)
    await clock.release()
    assert await asyncio.wait_for(run, 60) is outcome
    assert tree_snapshot(machine / "os") == before, "nothing written, nothing moved"
    assert any("refused, nothing changed" in line and "No space left" in line for line in lines), lines
    [result] = fleet.service.device_results(fleet.viewer, "dev-0001")
    assert result.outcome == "failed"
    assert BootEnv.read(machine / "esp/grub/grubenv").boot_count == 2, "not rebooted into the failing OS"


def test_the_refusal_names_the_journal_and_the_fix(machine, full_disk) -> None:
    from recovery_agent.protocol.wire import Directive, utcnow

    d = Directive(
        directive_id="dir-1",
        device_id="dev-1",
        agent_nonce="n" * 32,
        diagnostics_sha256="0" * 64,
        remediation_id="rem-1",
        issued_at=utcnow(),
        expires_at=utcnow(),
        actions=[{"type": "disable_driver", "name": "sensor"}],
    )
    with pytest.raises(
        RemediationError, match=r"intent journal .*dir-1\.json.*nothing was changed.*free space"
    ):
        remediate.apply_directive(machine / "os", d)
