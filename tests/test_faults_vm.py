"""Faults injected into the real VM (recovery_lab.faults): power cut through QMP at each step
of an apply, the cable pulled, the server killed and restarted, a full OS partition, a damaged
grubenv. Each is a whole run of the loop with the fault, ending with nothing lost. Faults that
disturb different moments share one run: a run costs minutes."""

from __future__ import annotations

import json

import pytest

from recovery_lab.inspect import OS, DiskImage
from recovery_lab.loop import RunOptions, run_async

from .test_recovery_loop import BAD, GOOD, opts, same_files

pytestmark = pytest.mark.qemu


def explain(o: RunOptions, report) -> str:
    return "\n".join([*report.problems, *o.lines[-60:]])  # type: ignore[attr-defined]


@pytest.mark.timeout(1200)
async def test_cable_pulled_twice_and_server_restarted_while_waiting_still_recover(tmp_path):
    """The cable is pulled for the report and again for the wait; then the server is killed
    and restarted on the same data while the agent waits. The restarted server still reaches
    the VM: each guest connection gets its own host connection (the old guestfwd's one
    connection died with the server and never came back)."""
    o = opts(
        "channel-file",
        tmp_path,
        auto_approve=True,
        timeout_s=1100,
        faults=["cable-pull", "server-restart"],
        time_to_reboot_min=400,
    )
    report = await run_async(o)
    assert report.recovered and report.met_expectations, explain(o, report)
    kinds = [e["kind"] for e in report.events]
    lab = [k for k in kinds if k.startswith("lab.")]
    assert lab == [
        "lab.cable_pulled",
        "lab.cable_back",
        "lab.cable_pulled",
        "lab.cable_back",
        "lab.server_stopped",
        "lab.server_started",
    ]
    # In the order the lab saw them (its clock reads them in polls a fifth of a second apart: on
    # a fast machine a directive and its result land in the same poll, at the same second).
    order = kinds.index
    assert order("lab.server_started") < order("directive.issued") < order("result.received")
    console = report.boot.console_text
    recovery = console.split("QMR-RECOVERY-AGENT start", 1)[1]
    assert "server not answering" in recovery or "not reachable" in recovery, "the agent saw the trouble"
    assert kinds.count("directive.issued") == 1 and kinds.count("diagnostics.received") == 1
    assert BAD not in report.disk["channel_files"]


@pytest.mark.timeout(1500)
async def test_power_cut_after_the_journal_the_move_the_manifest_and_the_grubenv_reset(tmp_path):
    """One run, four power cuts, one per recovery visit: after the intent journal, after the
    rename into quarantine (manifest not written), after the manifest (journal not updated),
    after boot_count was reset (result not sent). Each next visit finishes the same directive."""
    o = opts("channel-file", tmp_path, auto_approve=True, timeout_s=1400, faults=["power-loss"])
    report = await run_async(o)
    assert report.recovered and report.met_expectations, explain(o, report)
    console = report.boot.console_text
    for step in ("journal", "moved", "manifest", "grubenv"):
        assert f"QMR-HOLD {step}:" in console
    # Visits 2 and 3 are cut inside the roll forward itself; visit 4 finishes it.
    assert console.count("interrupted apply rolled forward") == 1
    assert report.boot.entries_chosen == ["os", "os", *["recovery"] * 4, "os"]
    [(folder, files)] = report.disk["quarantine"].items()
    assert files == sorted(["manifest.json", f"0-{BAD}"])
    [entry] = report.disk["manifests"][folder]["entries"]
    assert entry["original_path"].endswith(BAD)
    assert report.disk["journal_states"] == ["applied"]
    assert report.disk["grubenv"]["boot_count"] == "0"
    [directive] = report.server_incident["directives"]
    assert directive == {"directive_id": folder, "outcome": "succeeded"}
    assert report.server_incident["results"] == [], "the power went before the result"
    assert same_files(tmp_path, [f"var/lib/sensor/channels/{n}" for n in GOOD])
    with DiskImage(next((tmp_path / "run" / "vm").glob("*.qcow2"))) as disk:
        stored = disk.ext4_file(OS, f"var/lib/recovery/quarantine/{folder}/0-{BAD}")
    assert stored is not None and len(stored) > 0, "the file is never lost"


@pytest.mark.timeout(1200)
async def test_power_cut_while_a_driver_is_restored_and_before_the_result(tmp_path):
    """restore_file: the power goes after the old driver moved into quarantine, before the
    copy took its place (the module path is empty), then again just before the result."""
    o = opts(
        "bad-driver",
        tmp_path,
        auto_approve=True,
        timeout_s=1100,
        faults=["power-loss"],
        power_loss_at=("moved", "result"),
    )
    report = await run_async(o)
    assert report.recovered and report.met_expectations, explain(o, report)
    assert report.boot.entries_chosen == ["os", "os", "recovery", "recovery", "os"]
    [manifest] = report.disk["manifests"].values()
    assert "extra/sensor.ko" in json.dumps(manifest), "the 2.0 driver went to quarantine"
    assert "sensor: version 1.0" in report.boot.console_text.split("QMR-GRUB entry=")[-1]
    assert [d["outcome"] for d in report.server_incident["directives"]] == ["succeeded"]


@pytest.mark.timeout(900)
async def test_full_os_partition_refuses_the_fix_cleanly_and_reports_it(tmp_path):
    o = opts(
        "channel-file",
        tmp_path,
        auto_approve=True,
        timeout_s=800,
        faults=["disk-full"],
        max_recovery_attempts=1,
    )
    report = await run_async(o)
    assert not report.recovered and report.met_expectations, explain(o, report)
    console = report.boot.console_text
    assert "No space left on device" in console and "QMR-NEEDS-MANUAL" in console
    assert BAD in report.disk["channel_files"] and report.disk["quarantine"] == {}
    assert report.disk["journal_states"] == []
    assert [r["outcome"] for r in report.server_incident["results"]] == ["failed"]
    assert report.device["state"] in ("needs_manual", "remediation_failed")
    assert same_files(tmp_path, [f"var/lib/sensor/channels/{n}" for n in [BAD, *GOOD]])


@pytest.mark.timeout(1200)
async def test_damaged_grubenv_boots_recovery_which_rewrites_it_and_the_loop_goes_on(tmp_path):
    """docs/boot-counting.md: GRUB cannot read or save the block and boots recovery; the agent
    writes a fresh block in place; nothing crashed yet, so it reboots when its time is up; GRUB
    counts again, the OS fails twice, and the usual loop recovers the machine."""
    o = opts(
        "channel-file",
        tmp_path,
        auto_approve=True,
        timeout_s=1100,
        faults=["corrupt-grubenv"],
        time_to_reboot_min=15,
    )
    report = await run_async(o)
    assert report.recovered and report.met_expectations, explain(o, report)
    assert report.boot.entries_chosen == ["recovery", "os", "os", "recovery", "os"]
    console = report.boot.console_text
    assert console.index("QMR-GRUB save_env failed") < console.index("QMR-GRUB entry=recovery")
    assert "QMR-AGENT exit=10" in console
    assert report.disk["grubenv"]["boot_count"] == "0" and report.disk["grubenv"]["boot_limit"] == "2"
