"""Applying directives to an OS root laid out in a tmp dir: path safety, hashes, the intent
journal, power loss, undo and purge."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from recovery_agent import osroot
from recovery_agent.actions import HashMismatch
from recovery_agent.digest import sha256_fd
from recovery_agent.errors import RemediationError
from recovery_agent.journal import JournalError
from recovery_agent.layout import JOURNAL_DIR, QUARANTINE_DIR, STATE_DIR
from recovery_agent.osroot import MissingFile, OSRoot, PathRejected
from recovery_agent.protocol.wire import Directive, DisableDriver, QuarantineFile, RestoreFile
from recovery_agent.remediate import (
    apply_directive,
    list_quarantine,
    purge,
    recover_journals,
    undo,
)

from .conftest import tree_snapshot

CHANNELS = "var/lib/sensor/channels"
BAD_CHANNEL = f"{CHANNELS}/C-00000291-00000000-00000032.sys"
GOOD_CHANNELS = [
    f"{CHANNELS}/C-00000291-00000000-00000031.sys",
    f"{CHANNELS}/C-00000291-00000000-00000033.sys",
]
DRIVER = "lib/modules/6.1.0-test/extra/sensor.ko"
STORE = "var/lib/driver-store/sensor/1.0/sensor.ko"

BAD = b"channel 291 template fields=21 content fields=20\n"
GOOD_OLD = b"channel 291 template fields=20 content fields=20 (2024-07-18 04:09)\n"
GOOD_NEW = b"channel 291 template fields=20 content fields=20 (2024-07-18 05:27)\n"
DRIVER_V2 = b"\x7fELF sensor 2.0 (panics)\n"
DRIVER_V1 = b"\x7fELF sensor 1.0 (good)\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def snapshot(root: Path, *, include_state: bool = True) -> dict[str, tuple]:
    """path -> (type, sha256 or link target, mode), symlinks not followed."""
    return tree_snapshot(root, exclude=None if include_state else STATE_DIR)


def write(root: Path, rel: str, data: bytes, mode: int = 0o644) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An OS root as the recovery environment mounts it: channel files, a driver that panics,
    the driver store with the previous version, /etc without modprobe.d."""
    return build_root(tmp_path / "os")


def build_root(root: Path) -> Path:
    write(root, BAD_CHANNEL, BAD)
    write(root, GOOD_CHANNELS[0], GOOD_OLD)
    write(root, GOOD_CHANNELS[1], GOOD_NEW)
    write(root, DRIVER, DRIVER_V2, 0o640)
    write(root, STORE, DRIVER_V1, 0o444)
    (root / "etc").mkdir()
    return root


def directive(*actions: object, directive_id: str = "dir-0001") -> Directive:
    now = datetime.now(UTC)
    return Directive(
        directive_id=directive_id,
        device_id="vm-1",
        agent_nonce="n" * 22,
        diagnostics_sha256="0" * 64,
        remediation_id="rem-291",
        issued_at=now,
        expires_at=now + timedelta(hours=1),
        actions=list(actions),
    )


QUARANTINE_BAD = QuarantineFile(path=BAD_CHANNEL, sha256=sha(BAD))
RESTORE_DRIVER = RestoreFile(path=DRIVER, source=STORE, sha256=sha(DRIVER_V1))
DISABLE_SENSOR = DisableDriver(name="sensor")


def journal(root: Path, directive_id: str = "dir-0001") -> dict:
    return json.loads((root / JOURNAL_DIR / f"{directive_id}.json").read_text())


class PowerLoss(Exception):
    """Raised from on_step: the machine died right after that step was journaled."""


def power_loss_after(step: int):
    def on_step(index: int) -> None:
        if index == step:
            raise PowerLoss(index)

    return on_step


# --------------------------------------------------------------------------- rejected, unchanged


def rejected(root: Path, d: Directive, error: type[RemediationError], *fragments: str) -> None:
    before = snapshot(root)
    with pytest.raises(error) as caught:
        apply_directive(root, d)
    for fragment in fragments:
        assert fragment in str(caught.value)
    assert snapshot(root) == before
    assert not (root / STATE_DIR).exists()


def test_dotdot_is_rejected(root: Path) -> None:
    action = QuarantineFile.model_construct(path=f"{CHANNELS}/../../../../etc/passwd", sha256=sha(BAD))
    rejected(root, directive(action), PathRejected, "'..'", "etc/passwd")


def test_absolute_path_is_rejected(root: Path) -> None:
    write(root.parent, "outside.sys", BAD)  # would match if dir_fd were ignored
    action = QuarantineFile.model_construct(path=str(root.parent / "outside.sys"), sha256=sha(BAD))
    rejected(root, directive(action), PathRejected, "absolute")
    assert (root.parent / "outside.sys").read_bytes() == BAD


def test_symlinked_directory_is_rejected(root: Path, tmp_path: Path) -> None:
    # var/lib/sensor -> a tree outside the OS root holding a file with the matching hash
    outside = tmp_path / "outside"
    write(outside, "sensor/channels/C-00000291-00000000-00000032.sys", BAD)
    for p in sorted((root / "var/lib/sensor").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (root / "var/lib/sensor").rmdir()
    (root / "var/lib/sensor").symlink_to(outside / "sensor")
    rejected(root, directive(QUARANTINE_BAD), PathRejected, "var/lib/sensor", "symlink")
    assert (outside / "sensor/channels/C-00000291-00000000-00000032.sys").read_bytes() == BAD


def test_symlinked_file_is_rejected(root: Path) -> None:
    write(root, "var/lib/sensor/bad-copy.sys", BAD)
    (root / BAD_CHANNEL).unlink()
    (root / BAD_CHANNEL).symlink_to("../bad-copy.sys")
    rejected(root, directive(QUARANTINE_BAD), PathRejected, BAD_CHANNEL, "symlink")


def test_directory_or_fifo_is_not_a_file(root: Path) -> None:
    (root / CHANNELS / "dir.sys").mkdir()
    os.mkfifo(root / CHANNELS / "fifo.sys")
    for name, kind in (("dir.sys", "a directory"), ("fifo.sys", "a FIFO")):
        action = QuarantineFile(path=f"{CHANNELS}/{name}", sha256=sha(BAD))
        rejected(root, directive(action), PathRejected, kind)


def test_hash_mismatch_is_rejected(root: Path) -> None:
    # The fixed file has the bad one's name prefix; only its content tells them apart.
    action = QuarantineFile(path=GOOD_CHANNELS[1], sha256=sha(BAD))
    rejected(root, directive(action), HashMismatch, GOOD_CHANNELS[1], sha(BAD), sha(GOOD_NEW))


def test_a_file_with_other_hard_links_is_not_quarantined(root: Path) -> None:
    """Another name for the same inode would keep the bad content loadable."""
    os.link(root / BAD_CHANNEL, root / "var/lib/sensor/C-copy.sys")
    action = QuarantineFile(path=BAD_CHANNEL, sha256=sha(BAD))
    rejected(root, directive(action), PathRejected, BAD_CHANNEL, "2 hard links", "samefile")


def test_restore_source_with_wrong_hash_is_rejected(root: Path) -> None:
    write(root, STORE, b"corrupted store copy\n", 0o444)
    rejected(root, directive(RESTORE_DRIVER), HashMismatch, STORE, sha(DRIVER_V1), "driver store")


def test_missing_file_is_rejected(root: Path) -> None:
    action = QuarantineFile(path=f"{CHANNELS}/C-00000291-gone.sys", sha256=sha(BAD))
    rejected(root, directive(action), MissingFile, "C-00000291-gone.sys", "no such file")


def test_second_action_failing_preflight_blocks_the_first(root: Path) -> None:
    wrong = QuarantineFile(path=GOOD_CHANNELS[0], sha256=sha(BAD))
    rejected(root, directive(QUARANTINE_BAD, RESTORE_DRIVER, wrong), HashMismatch, GOOD_CHANNELS[0])
    assert (root / BAD_CHANNEL).read_bytes() == BAD


def test_agent_state_and_duplicates_are_rejected(root: Path) -> None:
    state = QuarantineFile(path="var/lib/recovery/journal/x.json", sha256=sha(BAD))
    rejected(root, directive(state), PathRejected, "agent's own state")
    rejected(root, directive(QUARANTINE_BAD, QUARANTINE_BAD), RemediationError, "both change")


def test_open_parent_walks_and_rejects(root: Path) -> None:
    with OSRoot(root) as os_root:
        with os_root.open_parent(BAD_CHANNEL) as (dir_fd, name):
            assert name == "C-00000291-00000000-00000032.sys"
            assert os.stat(name, dir_fd=dir_fd).st_size == len(BAD)
        with os_root.open_file(BAD_CHANNEL) as fd:
            assert sha256_fd(fd) == sha(BAD)
        (root / "var/lib/link").symlink_to("sensor")
        with pytest.raises(PathRejected, match="component var/lib/link is a symlink"):
            with os_root.open_parent("var/lib/link/channels/x"):
                pass
        assert os_root.missing_dirs("var/lib/recovery/journal") == [
            "var/lib/recovery",
            "var/lib/recovery/journal",
        ]


def test_mount_crossing_is_rejected(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real mount needs privileges; pretend var/lib/sensor is one by its mount id.
    sensor_ino = (root / "var/lib/sensor").stat().st_ino
    real = osroot.mount_id
    monkeypatch.setattr(osroot, "mount_id", lambda fd: 999 if os.fstat(fd).st_ino == sensor_ino else real(fd))
    rejected(root, directive(QUARANTINE_BAD), PathRejected, "var/lib/sensor", "another mount")


# --------------------------------------------------------------------------- applying


def test_quarantine_moves_only_the_bad_channel_file(root: Path) -> None:
    before = snapshot(root)
    results = apply_directive(root, directive(QUARANTINE_BAD))
    assert [(r.index, r.type, r.status) for r in results] == [(0, "quarantine_file", "applied")]
    assert not (root / BAD_CHANNEL).exists()
    after = snapshot(root)
    for good in GOOD_CHANNELS:
        assert after[good] == before[good]
    qdir = root / QUARANTINE_DIR / "dir-0001"
    stored = qdir / "0-C-00000291-00000000-00000032.sys"
    assert stored.read_bytes() == BAD
    assert stat.S_IMODE(qdir.stat().st_mode) == 0o700
    manifest = json.loads((qdir / "manifest.json").read_text())
    [entry] = manifest["entries"]
    assert entry["original_path"] == BAD_CHANNEL
    assert entry["stored_name"] == stored.name
    assert entry["sha256"] == sha(BAD)
    assert entry["size"] == len(BAD)
    assert entry["mode"] == 0o644
    assert entry["action_index"] == 0 and entry["role"] == "quarantined"
    assert entry["uid"] == os.getuid() and entry["quarantined_at"]
    assert journal(root)["state"] == "applied"
    assert journal(root)["steps"][0]["status"] == "done"
    [row] = list_quarantine(root)
    assert row.directive_id == "dir-0001" and row.present is True
    assert row.journal_state == "applied" and row.entry.original_path == BAD_CHANNEL


def test_restore_file_replaces_the_driver_and_quarantines_the_old_one(root: Path) -> None:
    results = apply_directive(root, directive(RESTORE_DRIVER))
    assert results[0].status == "applied"
    assert (root / DRIVER).read_bytes() == DRIVER_V1
    assert stat.S_IMODE((root / DRIVER).stat().st_mode) == 0o640  # the original's mode
    assert (root / STORE).read_bytes() == DRIVER_V1
    old = root / QUARANTINE_DIR / "dir-0001" / "0-sensor.ko"
    assert old.read_bytes() == DRIVER_V2
    [row] = list_quarantine(root)
    assert row.entry.role == "replaced" and row.entry.original_path == DRIVER
    assert not list((root / DRIVER).parent.glob(".recovery-*"))  # no temp file left


def test_restore_file_to_a_missing_target_uses_0644(root: Path) -> None:
    (root / DRIVER).unlink()
    apply_directive(root, directive(RESTORE_DRIVER))
    assert (root / DRIVER).read_bytes() == DRIVER_V1
    assert stat.S_IMODE((root / DRIVER).stat().st_mode) == 0o644


def test_disable_driver_writes_the_modprobe_conf(root: Path) -> None:
    results = apply_directive(root, directive(DISABLE_SENSOR))
    assert results[0].status == "applied"
    conf = root / "etc/modprobe.d/recovery-disable-sensor.conf"
    assert conf.read_text() == "blacklist sensor\ninstall sensor /bin/false\n"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o644
    assert stat.S_IMODE(conf.parent.stat().st_mode) == 0o755
    assert journal(root)["steps"][0]["creates"] == ["etc/modprobe.d"]


def test_reapply_is_idempotent(root: Path) -> None:
    d = directive(QUARANTINE_BAD, RESTORE_DRIVER, DISABLE_SENSOR)
    apply_directive(root, d)
    applied = snapshot(root)
    again = apply_directive(root, d)
    assert [r.status for r in again] == ["already_applied"] * 3
    assert snapshot(root) == applied

    # Without the journal, each step still finds its own work done.
    (root / JOURNAL_DIR / "dir-0001.json").unlink()
    again = apply_directive(root, d)
    assert [r.status for r in again] == ["already_applied"] * 3
    assert {k: v for k, v in snapshot(root).items() if "journal" not in k} == {
        k: v for k, v in applied.items() if "journal" not in k
    }


# --------------------------------------------------------------------------- power loss


def test_power_loss_after_step_0_rolls_forward(root: Path, tmp_path: Path) -> None:
    d = directive(QUARANTINE_BAD, RESTORE_DRIVER)
    with pytest.raises(PowerLoss):
        apply_directive(root, d, on_step=power_loss_after(0))
    state = journal(root)
    assert state["state"] == "applying"
    assert [s["status"] for s in state["steps"]] == ["done", "planned"]
    assert not (root / BAD_CHANNEL).exists() and (root / DRIVER).read_bytes() == DRIVER_V2

    with pytest.raises(JournalError, match="recover_journals"):
        apply_directive(root, d)

    lines = recover_journals(root)
    assert len(lines) == 1 and "rolled forward" in lines[0] and "dir-0001" in lines[0]
    assert journal(root)["state"] == "applied"

    # The same end state as an uninterrupted apply on a twin root.
    twin = build_root(tmp_path / "twin")
    apply_directive(twin, d)
    assert snapshot(root, include_state=False) == snapshot(twin, include_state=False)
    assert recover_journals(root) == []  # nothing left to recover
    assert [r.status for r in apply_directive(root, d)] == ["already_applied"] * 2


def test_power_loss_with_a_step_that_no_longer_applies_rolls_back(root: Path) -> None:
    original = snapshot(root)
    with pytest.raises(PowerLoss):
        apply_directive(root, directive(QUARANTINE_BAD, RESTORE_DRIVER), on_step=power_loss_after(0))
    # Meanwhile the driver store copy went bad: step 1 can no longer preflight.
    write(root, STORE, b"damaged\n", 0o444)
    lines = recover_journals(root)
    assert len(lines) == 1 and "rolled back" in lines[0] and STORE in lines[0]
    expected = dict(original)
    expected[STORE] = ("file", sha(b"damaged\n"), 0o444)
    assert snapshot(root, include_state=False) == {
        k: v for k, v in expected.items() if not k.startswith(STATE_DIR)
    }
    assert journal(root)["state"] == "rolled_back"
    assert recover_journals(root) == []
    with pytest.raises(JournalError, match="rolled back"):
        apply_directive(root, directive(QUARANTINE_BAD, RESTORE_DRIVER))


def test_power_loss_inside_a_restore_is_rolled_forward(root: Path) -> None:
    # Died after the old driver went to quarantine, before the new one was renamed in; a
    # half-written temp file is left over.
    with pytest.raises(PowerLoss):
        apply_directive(root, directive(QUARANTINE_BAD, RESTORE_DRIVER), on_step=power_loss_after(0))
    qdir = root / QUARANTINE_DIR / "dir-0001"
    os.rename(root / DRIVER, qdir / "1-sensor.ko")
    write(root, str(Path(DRIVER).parent / ".recovery-dir-0001-1.tmp"), b"\x7fELF sen")
    [line] = recover_journals(root)
    assert "rolled forward" in line
    assert (root / DRIVER).read_bytes() == DRIVER_V1
    assert stat.S_IMODE((root / DRIVER).stat().st_mode) == 0o640
    assert not list((root / DRIVER).parent.glob(".recovery-*"))
    roles = {r.entry.stored_name: r.entry.role for r in list_quarantine(root)}
    assert roles == {"0-C-00000291-00000000-00000032.sys": "quarantined", "1-sensor.ko": "replaced"}


def test_step_failing_after_preflight_rolls_back_what_was_done(root: Path) -> None:
    original = snapshot(root)

    def tamper(index: int) -> None:  # the store copy changes after preflight passed
        if index == 0:
            write(root, STORE, b"changed underneath\n", 0o444)

    with pytest.raises(RemediationError, match="step 1 .* failed: .*rolled back") as caught:
        apply_directive(root, directive(QUARANTINE_BAD, RESTORE_DRIVER), on_step=tamper)
    assert isinstance(caught.value.__cause__, HashMismatch)
    current = snapshot(root, include_state=False)
    assert current.pop(STORE)[1] == sha(b"changed underneath\n")
    assert current == {k: v for k, v in original.items() if k != STORE and not k.startswith(STATE_DIR)}
    assert journal(root)["state"] == "rolled_back"


# --------------------------------------------------------------------------- undo and purge


def test_undo_restores_the_original_tree(root: Path) -> None:
    original = snapshot(root)
    apply_directive(root, directive(QUARANTINE_BAD, RESTORE_DRIVER, DISABLE_SENSOR))
    assert snapshot(root) != original
    lines = undo(root, "dir-0001")
    assert len(lines) == 3
    assert snapshot(root, include_state=False) == original  # content and mode, modprobe.d gone
    assert journal(root)["state"] == "rolled_back"
    assert undo(root, "dir-0001") == ["directive dir-0001 is already rolled back; nothing changed"]


def test_undo_puts_back_replaced_files_and_removes_new_ones(root: Path) -> None:
    write(root, "etc/modprobe.d/recovery-disable-sensor.conf", b"# local note\n", 0o600)
    (root / DRIVER).unlink()
    original = snapshot(root)
    apply_directive(root, directive(RESTORE_DRIVER, DISABLE_SENSOR))
    assert (root / DRIVER).read_bytes() == DRIVER_V1
    undo(root, "dir-0001")
    assert snapshot(root, include_state=False) == original
    roles = sorted(r.entry.role for r in list_quarantine(root))
    assert roles == ["replaced", "undone"]  # the restored driver was moved aside, not deleted


def test_undo_leaves_quarantine_when_the_path_is_taken(root: Path) -> None:
    apply_directive(root, directive(QUARANTINE_BAD))
    write(root, BAD_CHANNEL, GOOD_NEW)  # the vendor's fixed file arrived under the same name
    with pytest.raises(RemediationError, match="exists again"):
        undo(root, "dir-0001")
    assert (root / BAD_CHANNEL).read_bytes() == GOOD_NEW
    assert journal(root)["state"] == "rolling_back"  # retried at each agent start
    [line] = recover_journals(root)
    assert "still incomplete" in line and "move that file aside" in line
    (root / BAD_CHANNEL).rename(root / CHANNELS / "fixed.sys.aside")
    [line] = recover_journals(root)
    assert "roll back finished" in line
    assert (root / BAD_CHANNEL).read_bytes() == BAD
    assert journal(root)["state"] == "rolled_back"


def test_power_loss_during_roll_back_is_finished_not_rolled_forward(root: Path) -> None:
    original = snapshot(root)
    d = directive(QUARANTINE_BAD, RESTORE_DRIVER)
    with pytest.raises(PowerLoss):
        apply_directive(root, d, on_step=power_loss_after(0))
    # A roll back began (journal "rolling_back") and moved step 0's file back, then power went.
    path = root / JOURNAL_DIR / "dir-0001.json"
    state = json.loads(path.read_text())
    state["state"] = "rolling_back"
    path.write_text(json.dumps(state))
    os.rename(
        root / QUARANTINE_DIR / "dir-0001" / "0-C-00000291-00000000-00000032.sys",
        root / BAD_CHANNEL,
    )
    [line] = recover_journals(root)
    assert "roll back finished" in line
    assert snapshot(root, include_state=False) == {
        k: v for k, v in original.items() if not k.startswith(STATE_DIR)
    }
    assert journal(root)["state"] == "rolled_back"


def test_undo_and_purge_refuse_unknown_directives(root: Path) -> None:
    with pytest.raises(JournalError, match="never applied"):
        undo(root, "dir-9999")
    with pytest.raises(JournalError, match="not a valid identifier"):
        undo(root, "../etc")
    with pytest.raises(JournalError, match="nothing to purge"):
        purge(root, "dir-9999")


def test_purge_deletes_the_quarantine(root: Path) -> None:
    d = directive(QUARANTINE_BAD, RESTORE_DRIVER)
    apply_directive(root, d)
    applied = snapshot(root, include_state=False)
    purge(root, "dir-0001")
    assert not (root / QUARANTINE_DIR / "dir-0001").exists()
    assert list_quarantine(root) == []
    assert journal(root)["state"] == "purged"
    assert snapshot(root, include_state=False) == applied
    with pytest.raises(JournalError, match="purged"):
        undo(root, "dir-0001")
    assert [r.status for r in apply_directive(root, d)] == ["already_applied"] * 2
    purge(root, "dir-0001")  # twice is fine


def test_corrupt_journal_is_reported(root: Path) -> None:
    write(root, f"{JOURNAL_DIR}/dir-0001.json", b"{not json", 0o600)
    [line] = recover_journals(root)
    assert "dir-0001" in line and "not a valid IntentJournal" in line
    with pytest.raises(JournalError, match="move it aside"):
        apply_directive(root, directive(QUARANTINE_BAD))


# --------------------------------------------------------------------------- restore_file's gaps


def test_restore_over_a_driver_with_other_hard_links_is_refused(root: Path) -> None:
    """Replacing one name would leave the crashing module loadable through the other."""
    os.link(root / DRIVER, root / "lib/modules/6.1.0-test/extra/sensor-old.ko")
    rejected(root, directive(RESTORE_DRIVER), PathRejected, DRIVER, "2 hard links", "samefile")


def test_restore_from_outside_the_driver_store_is_refused_on_the_device(root: Path) -> None:
    """The wire refuses such a source; the agent checks again where it applies it (a directive
    from an older server, a journal written before the rule)."""
    shadow = b"root:$6$secret:19000:0:99999:7:::\n"
    write(root, "etc/shadow", shadow, 0o600)
    action = RestoreFile.model_construct(
        type="restore_file", path=DRIVER, source="etc/shadow", sha256=sha(shadow)
    )
    rejected(root, directive(action), PathRejected, "etc/shadow", "not in the driver store")


# --------------------------------------------------------------------------- undo without the manifest


def test_undo_with_an_unreadable_manifest_works_in_one_attempt(root: Path) -> None:
    """The manifest is a record for people; undo takes what it needs from the journal and the
    quarantine folder itself, and says truly what it undid."""
    original = snapshot(root, include_state=False)
    apply_directive(root, directive(QUARANTINE_BAD, RESTORE_DRIVER, DISABLE_SENSOR))
    manifest = root / QUARANTINE_DIR / "dir-0001" / "manifest.json"
    manifest.write_bytes(b"{not json")
    lines = undo(root, "dir-0001")
    assert snapshot(root, include_state=False) == original
    assert journal(root)["state"] == "rolled_back"
    assert [s["status"] for s in journal(root)["steps"]] == ["rolled_back"] * 3
    assert not any("could not be undone" in line for line in lines), lines
    assert any(
        "moved var/lib/sensor/channels/C-00000291-00000000-00000032.sys back" in line for line in lines
    )
    assert any(f"put the previous {DRIVER} back" in line for line in lines)
    assert any("manifest" in line and "not updated" in line for line in lines), lines
    assert manifest.read_bytes() == b"{not json"  # left for a person to inspect
    # What is held is still listed, from the journal.
    held = {(r.entry.role, r.entry.original_path, r.present) for r in list_quarantine(root)}
    assert ("undone", DRIVER, True) in held


def test_apply_with_an_unreadable_manifest_still_applies_and_records_in_the_journal(root: Path) -> None:
    qdir = root / QUARANTINE_DIR / "dir-0001"
    qdir.mkdir(parents=True, mode=0o700)
    (qdir / "manifest.json").write_bytes(b"\x00garbage")
    results = apply_directive(root, directive(QUARANTINE_BAD, RESTORE_DRIVER))
    assert [r.status for r in results] == ["applied", "applied"]
    assert all("manifest" in r.detail and "not updated" in r.detail for r in results)
    steps = journal(root)["steps"]
    assert [m["stored_name"] for s in steps for m in s["moved"]] == [
        "0-C-00000291-00000000-00000032.sys",
        "1-sensor.ko",
    ]
    assert steps[1]["moved"][0]["mode"] == 0o640
