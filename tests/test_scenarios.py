"""Scenarios booted for real without a seed disk (``recovery-lab boot``: no agent, the
recovery environment prints pstore and the boot count and powers off): Debian's kernel, GRUB
counting boots, pstore surviving the in-VM reboot, the recovery entry. Each run is judged
against the scenario's own [expect] block from QMP events and console markers.

The scenarios with a loop test (channel-file, bad-driver, boot-hang, unknown) have their
failed boots judged against the same block inside that run (tests/test_recovery_loop.py):
one boot checks both, which keeps the QEMU tests in CI's time."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from recovery_lab.boot import boot_scenario
from recovery_lab.build import build_images, default_cache_dir
from recovery_lab.checkout import REPO
from recovery_lab.expect import problems
from recovery_lab.inspect import DiskImage
from recovery_lab.scenario import find_scenario, load_scenario
from recovery_lab.timeline import EntryKind

pytestmark = pytest.mark.qemu


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def expect(name: str):
    return load_scenario(find_scenario(name, REPO / "images")).expect


@pytest.fixture(scope="session")
def images():
    return {a.scenario: a for a in build_images(None, default_cache_dir(), log=lambda line: None)}


def _run(artifact, tmp_path: Path, timeout: float):
    base_before = _sha(artifact.image)
    report = boot_scenario(artifact.image, timeout=timeout, keep_logs=True, run_dir=tmp_path / "run")
    assert _sha(artifact.image) == base_before, "the base image must never be written"
    return report


@pytest.mark.timeout(200)
def test_healthy_boots_and_its_health_check_resets_boot_count(images, tmp_path):
    a = images["healthy"]
    report = _run(a, tmp_path, 150)
    assert problems(report, expect("healthy")) == [], report.render()
    assert report.entries_chosen == ["os"] and report.boots == 1
    assert report.shutdown_reason == "guest-shutdown"
    [overlay] = (tmp_path / "run").glob("*.qcow2")
    with DiskImage(overlay) as disk:
        env = disk.grubenv()
    assert env.boot_count == 0 and len(env.to_bytes()) == 1024


@pytest.mark.timeout(300)
def test_init_crash_fails_its_own_way_and_ends_in_recovery_which_reads_pstore(images, tmp_path):
    report = _run(images["init-crash"], tmp_path, 260)
    assert problems(report, expect("init-crash")) == [], report.render()
    assert report.entries_chosen == ["os", "os", "recovery"]
    assert report.guest_panicked == 2
    assert report.resets >= 2, "the guest rebooted itself after each panic (panic=5)"
    assert report.timeline.of_kind(EntryKind.PSTORE), "the recovery environment printed the pstore records"
    [overlay] = (tmp_path / "run").glob("*.qcow2")
    with DiskImage(overlay) as disk:
        assert disk.grubenv().boot_count == 2


@pytest.mark.timeout(600)
def test_two_builds_give_identical_images(images, tmp_path):
    """A second, cold build in another cache directory: same inputs, same bytes."""
    other = build_images(["channel-file"], tmp_path / "cache", log=lambda line: None)[0]
    try:
        assert other.sha256 == images["channel-file"].sha256
        assert _sha(other.image) == _sha(images["channel-file"].image)
    finally:
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)
