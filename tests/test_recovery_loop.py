"""The mission end to end in QEMU: a machine that crashes at boot, GRUB's switch to the
recovery environment, the Python agent inside it reporting to a real server on the host,
an approved fix, the reboot, and the healthy boot reported back.

Each run's failed boots are also judged against the scenario's own [expect] block (panics,
watchdog resets, the module and function named, console lines), so one boot of a scenario
checks both; tests/test_scenarios.py boots the scenarios that have no loop here."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from recovery_lab.boot import BootReport
from recovery_lab.checkout import REPO
from recovery_lab.expect import problems
from recovery_lab.inspect import OS, DiskImage
from recovery_lab.loop import RunOptions, run_async
from recovery_lab.scenario import find_scenario, load_scenario
from recovery_lab.timeline import EntryKind, Timeline

pytestmark = pytest.mark.qemu

BAD = "C-00000291-00000000-00000032.sys"
GOOD = ["C-00000290-00000000-00000007.sys", "C-00000291-00000000-00000031.sys"]


def failed_boots(boot: BootReport) -> BootReport:
    """The run up to the first recovery environment's agent: the failed boots a scenario's
    [expect] block describes."""
    entries = boot.timeline.entries
    first = next(e for e in entries if e.kind is EntryKind.GRUB_ENTRY and e.data.get("entry") == "recovery")
    return BootReport.from_timeline(
        Timeline([e for e in entries if e.boot <= first.boot]),
        outcome=boot.outcome,
        seconds=boot.seconds,
        exit_status=boot.exit_status,
        run_dir=None,
        console_text=boot.console_text.split("QMR-RECOVERY-AGENT start", 1)[0],
    )


def as_scenario_expects(report, name: str) -> list[str]:
    """Every way the run's failed boots differ from the scenario's [expect] block."""
    return problems(failed_boots(report.boot), load_scenario(find_scenario(name, REPO / "images")).expect)


def opts(scenario: str, tmp_path, **kw) -> RunOptions:
    lines: list[str] = []
    o = RunOptions(scenario=scenario, workdir=tmp_path / "run", keep=True, log=lines.append, **kw)
    o.lines = lines  # type: ignore[attr-defined]
    return o


@pytest.mark.timeout(900)
async def test_channel_file_is_recovered_with_no_human_step_but_the_approval(tmp_path):
    o = opts("channel-file", tmp_path, auto_approve=True, timeout_s=800)
    report = await run_async(o)
    assert report.recovered, "\n".join(o.lines[-40:]) + json.dumps(report.to_json()["phases"])
    disk = report.disk
    assert BAD not in disk["channel_files"] and sorted(GOOD) == disk["channel_files"]
    [(folder, files)] = disk["quarantine"].items()
    assert files == sorted(["manifest.json", f"0-{BAD}"])
    assert BAD in json.dumps(disk["manifests"][folder])
    assert disk["grubenv"]["boot_count"] == "0"
    assert same_files(tmp_path, [f"var/lib/sensor/channels/{n}" for n in GOOD]), "good files untouched"
    inc = report.server_incident
    assert inc["title"] == "general protection fault in sensor_parse_channel"
    assert inc["channel_file"] == f"var/lib/sensor/channels/{BAD}"
    assert inc["devices"] == ["lab-channel-file"] and inc["results"][0]["outcome"] == "applied"
    assert report.device["state"] == "healthy"
    assert report.boot.entries_chosen[:3] == ["os", "os", "recovery"]
    assert report.boot.entries_chosen[-1] == "os" and report.boot.healthy
    assert report.boot.panics == ["general protection fault in sensor_parse_channel"] * 2
    assert as_scenario_expects(report, "channel-file") == []
    assert report.boot.guest_panicked == 2, "pvpanic reported both panics over QMP"
    assert report.boot.resets >= 2, "the guest rebooted itself after each panic (panic=5)"
    pstore = {e.data.get("crash") for e in report.boot.timeline.of_kind(EntryKind.PSTORE)}
    assert "general protection fault in sensor_parse_channel" in pstore, "recovery printed pstore"
    assert "boot_count=2 (limit 2)" in report.boot.console_text, "the agent read GRUB's count"
    names = [p.name for p in report.phases]
    assert names[0] == "failed boots" and names[-1] == "reboot to a healthy boot"


def vendor_driver_scenario(tmp_path) -> str:
    """``bad-driver`` as a vendor brings it: their own build of the crashing driver
    (``source = "file:..."``; here the lab's sensor 2.0, taken from the shipped image)."""
    from recovery_lab.build import build_image

    shipped = build_image("bad-driver", log=lambda line: None)
    with DiskImage(shipped.image) as d:
        ko = d.ext4_file(OS, f"lib/modules/{shipped.kernel_release}/extra/sensor.ko")
    assert ko is not None
    (tmp_path / "vendor-build").mkdir()
    (tmp_path / "vendor-build" / "sensor.ko").write_bytes(ko)
    text = (REPO / "images/scenarios/bad-driver.toml").read_text()
    assert 'source = "sensor:2.0"' in text
    path = tmp_path / "vendor-driver.toml"
    path.write_text(
        text.replace('name = "bad-driver"', 'name = "vendor-driver"').replace(
            'source = "sensor:2.0"', 'source = "file:vendor-build/sensor.ko"'
        )
    )
    return str(path)


@pytest.mark.timeout(900)
async def test_a_silent_crash_is_traced_by_the_fleets_files_and_recovered(tmp_path):
    """The driver names no channel file and no other version is stored: the catalog knows no
    fix. A simulated fleet (150 devices over HTTP, recovery_lab/fleet.py) sends inventories and
    the same crash; the correlation names the bad file and its sha256 as the machine reported
    them, the drafted quarantine is approved, and the QEMU machine recovers."""
    import hashlib

    from recovery_lab.build import build_image

    o = opts("silent-channel-file", tmp_path, auto_approve=True, fleet=150, timeout_s=800)
    report = await run_async(o)
    assert report.recovered, "\n".join(o.lines[-40:]) + json.dumps(report.to_json()["phases"])
    assert as_scenario_expects(report, "silent-channel-file") == []
    assert "loading channel file" not in failed_boots(report.boot).console_text, "the driver is silent"
    inc = report.server_incident
    assert inc["channel_file"] is None and inc["guilty_module"] == "sensor"
    assert inc["fleet"]["devices"] == 150
    with DiskImage(build_image("silent-channel-file", log=lambda line: None).image) as base:
        bad = base.ext4_file(OS, f"var/lib/sensor/channels/{BAD}")
    assert bad is not None
    top = inc["correlation"]["candidates"][0]
    assert (top["path"], top["sha256"]) == (f"var/lib/sensor/channels/{BAD}", hashlib.sha256(bad).hexdigest())
    assert top["p_value"] < 1e-6 and top["crashing_share"] >= 0.6
    disk = report.disk
    assert BAD not in disk["channel_files"] and sorted(GOOD) == disk["channel_files"]
    [(folder, files)] = disk["quarantine"].items()
    assert files == sorted(["manifest.json", f"0-{BAD}"])
    assert report.device["state"] == "healthy"
    # The fixed OS's health report carried its inventory (recovery-agent health, in the guest):
    # the server now knows it runs the good channel files and no longer the bad one.
    import sqlite3

    with contextlib.closing(sqlite3.connect(Path(report.workdir) / "server/recovery.db")) as db:
        runs = dict(
            db.execute(
                "SELECT path, sha256 FROM device_files WHERE device_id = ?", (report.device["device_id"],)
            )
        )
    assert {f"var/lib/sensor/channels/{n}" for n in GOOD} <= set(runs)
    assert f"var/lib/sensor/channels/{BAD}" not in runs


@pytest.mark.timeout(900)
async def test_bad_driver_from_a_vendors_own_build_is_recovered_by_restoring_the_stored_version(tmp_path):
    scenario = vendor_driver_scenario(tmp_path)
    o = opts(scenario, tmp_path, auto_approve=True, timeout_s=800)
    report = await run_async(o)
    assert report.recovered, "\n".join(o.lines[-40:])
    assert report.scenario == "vendor-driver"
    assert as_scenario_expects(report, scenario) == []
    assert report.boot.guest_panicked == 2
    [manifest] = report.disk["manifests"].values()
    assert "extra/sensor.ko" in json.dumps(manifest), "the 2.0 driver went to quarantine"
    assert report.server_incident["guilty_frame"] == "sensor_v2_init_tables"
    assert "sensor: version 1.0" in report.boot.console_text.split("QMR-GRUB entry=recovery")[-1]


@pytest.mark.timeout(900)
async def test_unknown_crash_retries_reboots_and_then_asks_for_a_person(tmp_path):
    o = opts(
        "unknown",
        tmp_path,
        auto_approve=True,
        timeout_s=800,
        retry_interval_min=4,
        time_to_reboot_min=12,
        max_recovery_attempts=2,
    )
    report = await run_async(o)
    assert not report.recovered
    assert as_scenario_expects(report, "unknown") == []
    assert report.device["state"] == "needs_manual"
    console = report.boot.console_text
    assert console.count("QMR-RECOVERY-AGENT start") == 2, "two recovery attempts"
    assert "QMR-AGENT exit=10" in console and "QMR-AGENT exit=12" in console
    assert "QMR-NEEDS-MANUAL" in console
    retries = [e for e in report.boot.timeline.of_kind(EntryKind.AGENT) if "asking again" in e.detail]
    assert len(retries) >= 2, "the agent asked again at the retry interval"
    kinds = [e["kind"] for e in report.events]
    assert kinds.count("diagnostics.received") == 2 and "device.needs_manual" in kinds
    assert "directive.issued" not in kinds


@pytest.mark.timeout(900)
async def test_altered_directive_is_rejected_inside_the_vm_and_nothing_changes(tmp_path):
    o = opts(
        "channel-file",
        tmp_path,
        auto_approve=True,
        timeout_s=800,
        faults=["tamper-directive"],
        time_to_reboot_min=30,
        max_recovery_attempts=1,
    )
    report = await run_async(o)
    assert not report.recovered and report.met_expectations, report.problems
    console = report.boot.console_text
    assert "directive REJECTED" in console and "does not verify" in console
    assert BAD in report.disk["channel_files"], "the bad file is still in place: nothing applied"
    assert report.disk["quarantine"] == {}
    assert same_files(tmp_path, [f"var/lib/sensor/channels/{n}" for n in [BAD, *GOOD]])
    with DiskImage(next((tmp_path / "run" / "vm").glob("*.qcow2"))) as disk:
        assert disk.ext4_listdir(OS, "var/lib/recovery") == [], "no journal, no quarantine written"
    assert report.server_incident["results"] == []


def same_files(tmp_path, paths: list[str]) -> bool:
    """The files on the run's OS partition are byte for byte those of the base image."""
    from recovery_lab.build import build_image

    base = build_image(
        json.loads((tmp_path / "run" / "report.json").read_text())["scenario"], log=lambda line: None
    ).image
    overlay = next((tmp_path / "run" / "vm").glob("*.qcow2"))
    with DiskImage(base) as before, DiskImage(overlay) as after:
        for path in paths:
            original = before.ext4_file(OS, path)
            if original is None or after.ext4_file(OS, path) != original:
                return False
    return True


@pytest.mark.timeout(900)
async def test_boot_hang_is_recovered_by_disabling_the_driver(tmp_path):
    """No panic, no pstore record: the watchdog resets the machine twice. The OS's boot
    progress log says where it stopped; the fix disables the driver and the OS boots
    degraded but healthy."""
    o = opts("boot-hang", tmp_path, auto_approve=True, timeout_s=800)
    report = await run_async(o)
    assert report.recovered, "\n".join(o.lines[-40:])
    inc = report.server_incident
    assert inc["kind"] == "hang" and inc["title"] == "boot hung: load module sensor"
    assert inc["guilty_module"] == "sensor"
    assert report.boot.watchdog_fires == 2 and report.boot.panics == []
    assert as_scenario_expects(report, "boot-hang") == []
    assert report.boot.guest_panicked == 0
    with DiskImage(next((tmp_path / "run" / "vm").glob("*.qcow2"))) as disk:
        conf = disk.ext4_file(OS, "etc/modprobe.d/recovery-disable-sensor.conf")
    assert conf is not None and b"blacklist sensor" in conf
    last_boot = report.boot.console_text.split("QMR-GRUB entry=")[-1]
    assert "QMR-OS sensor disabled" in last_boot and "sensor disabled by a remediation" in last_boot


@pytest.mark.timeout(900)
async def test_a_recovery_test_visits_recovery_changes_nothing_and_boots_back(tmp_path):
    """Test mode on the healthy image: an operator asks before the machine boots; its health
    report's answer arms the test (grubenv), the lab's OS reboots into it, the agent runs the
    loop with the server's test directive and boots back; the next health report is the pass.
    The OS partition after the run is the image's, file by file, but for the agent's own state
    and what the OS writes on each boot."""
    o = opts("healthy", tmp_path, recovery_test=True, timeout_s=800)
    report = await run_async(o)
    t = report.recovery_test
    assert report.problems == [], "\n".join(o.lines[-40:]) + json.dumps(t)
    assert t["grub_entries"] == ["os", "recovery", "os"]
    [test] = t["tests"]
    assert test["outcome"] == "passed" and test["requested_by"] == "lab-operator"
    assert t["passed_at"] is not None and t["os_changed"] == []
    assert t["test_records"] == [f"var/lib/recovery/tests/{test['test_id']}.json"]
    assert t["visit_s"] < t["result_s"] < t["passed_s"]
    kinds = [e["kind"] for e in report.events if e["kind"].startswith("recovery_test.")]
    assert kinds == [
        "recovery_test.requested",
        "recovery_test.visit",
        "recovery_test.result",
        "recovery_test.passed",
    ]
    assert report.server_incident is None, "a test opens no incident"
    text = report.boot.console_text
    assert "QMR-RECOVERY-TEST armed by the server" in text
    assert "recovery test visit (armed by server)" in text
    assert "recovery test passed here" in text
    assert report.disk["quarantine"] == {}
    assert report.disk["grubenv"]["boot_count"] == "0" and "recovery_test" not in report.disk["grubenv"]
    assert report.device["state"] == "healthy"
    assert report.device["recovery_test_passed_at"] is not None
