"""The audit log: every admin and device action, hash-chained; edits and removals show."""

from __future__ import annotations

import asyncio
import sys

from recovery_server.audit import verify_chain


def _fill(fleet) -> None:
    admin = fleet.user("admin")
    fleet.service.create_enrollment_token(admin, "a")
    fleet.service.create_user(fleet.admin, "carol", "viewer")
    fleet.service.create_remediation(
        fleet.user("alice"),
        title="t",
        incident_id=None,
        actions=[{"type": "disable_driver", "name": "sensor"}],
    )


async def test_intact_chain_verifies(fleet):
    _fill(fleet)
    result = verify_chain(fleet.store)
    assert result.ok, result.problems
    assert result.entries == fleet.count("events") >= 8
    kinds = [e.kind for e in fleet.service.events(fleet.viewer)]
    assert "user.created" in kinds and "remediation.created" in kinds


async def test_edited_entry_is_found(fleet):
    _fill(fleet)
    with fleet.store.tx() as tx:
        tx.execute("UPDATE events SET actor = 'mallory' WHERE seq = 3")
    result = verify_chain(fleet.store)
    assert not result.ok
    assert any("entry 3" in p and "edited" in p for p in result.problems)


async def test_rehashed_edit_breaks_the_next_link(fleet):
    """An attacker who recomputes the edited entry's hash still breaks the chain after it."""
    from recovery_server.audit import entry_hash

    _fill(fleet)
    row = fleet.store.one("SELECT * FROM events WHERE seq = 3")
    entry = {k: row[k] for k in ("seq", "at", "kind", "actor", "device_id", "subject", "detail")}
    entry["actor"] = "mallory"
    with fleet.store.tx() as tx:
        tx.execute(
            "UPDATE events SET actor = ?, hash = ? WHERE seq = 3",
            "mallory",
            entry_hash(row["prev_hash"], entry),
        )
    problems = verify_chain(fleet.store).problems
    assert any("entry 4 does not follow" in p for p in problems)


async def test_removed_entry_is_found(fleet):
    _fill(fleet)
    with fleet.store.tx() as tx:
        tx.execute("DELETE FROM events WHERE seq = 2")
    problems = verify_chain(fleet.store).problems
    assert any("entries 2..2 are missing" in p for p in problems)


async def test_entries_cut_off_the_end_are_found(fleet):
    _fill(fleet)
    head = verify_chain(fleet.store).head
    last = int(head.split(":")[0])
    with fleet.store.tx() as tx:
        tx.execute("DELETE FROM events WHERE seq >= ?", last - 1)
    problems = verify_chain(fleet.store, expect_head=head).problems
    assert any(f"entries {last - 1}..{last} are missing at the end" in p for p in problems)


async def test_admin_cli_verify_exits_nonzero_on_a_broken_chain(fleet, tmp_path):
    _fill(fleet)
    token = fleet.service.create_user(fleet.admin, "auditor", "viewer").token
    cmd = [
        sys.executable,
        "-m",
        "recovery_server.admin_cli",
        "--server",
        fleet.url,
        "--token",
        token,
        "audit",
        "verify",
    ]
    code, out = await run(cmd)
    assert code == 0 and "chain intact" in out
    with fleet.store.tx() as tx:
        tx.execute("UPDATE events SET detail = '{}' WHERE seq = 1")
    code, out = await run(cmd)
    assert code == 1 and "entry 1 (user.created) was edited" in out


async def run(cmd: list[str]) -> tuple[int, str]:
    """A real process; the server it talks to runs on this event loop, so do not block it."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode()
