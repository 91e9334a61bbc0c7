"""The agent's own state files on the OS disk: last-directive, confirmed-directive and the
archived crash records. A symlink planted at one of them, at its temp name or at a folder on
the way must never be followed: nothing outside the OS root may change."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recovery_agent import state
from recovery_agent.layout import CONFIRMED_DIRECTIVE, LAST_DIRECTIVE, PSTORE_ARCHIVE, STATE_DIR
from recovery_agent.osroot import PathRejected
from recovery_agent.remediate import apply_directive, list_quarantine

from .conftest import tree_snapshot
from .test_remediate import QUARANTINE_BAD, build_root, directive, journal


@pytest.fixture
def os_root(tmp_path: Path) -> Path:
    root = tmp_path / "os"
    (root / STATE_DIR).mkdir(parents=True)
    return root


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A file and a folder outside the OS root that a followed symlink would change."""
    out = tmp_path / "outside"
    out.mkdir()
    (out / "precious").write_text("keep me\n")
    (out / "dir").mkdir()
    return out


def test_record_applied_writes_last_directive(os_root: Path) -> None:
    state.record_applied(os_root, "dir-0001")
    assert (os_root / LAST_DIRECTIVE).read_text() == "dir-0001\n"
    assert state.last_directive(os_root) == "dir-0001"
    assert state.confirm_last_directive(os_root) is True
    assert not (os_root / LAST_DIRECTIVE).exists()
    assert state.confirmed_directive(os_root) == "dir-0001"
    assert state.confirm_last_directive(os_root) is False  # nothing left to confirm


def test_record_applied_makes_the_state_folder(tmp_path: Path) -> None:
    root = tmp_path / "os"
    root.mkdir()
    state.record_applied(root, "dir-0001")
    assert (root / LAST_DIRECTIVE).read_text() == "dir-0001\n"
    assert oct((root / STATE_DIR).stat().st_mode & 0o777) == oct(0o700)


def test_a_symlink_at_last_directive_is_replaced_not_followed(os_root: Path, outside: Path) -> None:
    (os_root / LAST_DIRECTIVE).symlink_to(outside / "precious")
    before = tree_snapshot(outside)
    state.record_applied(os_root, "dir-0001")
    assert tree_snapshot(outside) == before
    assert not (os_root / LAST_DIRECTIVE).is_symlink()
    assert (os_root / LAST_DIRECTIVE).read_text() == "dir-0001\n"


def test_a_symlink_at_the_temp_name_is_refused(os_root: Path, outside: Path) -> None:
    tmp = os_root / STATE_DIR / ".last-directive.tmp"
    tmp.symlink_to(outside / "precious")
    before = tree_snapshot(outside)
    with pytest.raises(PathRejected, match=r"\.last-directive\.tmp is a symlink.*remove it"):
        state.record_applied(os_root, "dir-0001")
    assert tree_snapshot(outside) == before
    assert not (os_root / LAST_DIRECTIVE).exists()
    assert tmp.is_symlink()


def test_a_symlinked_state_folder_is_refused(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "os"
    (root / "var/lib").mkdir(parents=True)
    (root / STATE_DIR).symlink_to(outside / "dir")
    before = tree_snapshot(outside)
    with pytest.raises(PathRejected, match="symlink"):
        state.record_applied(root, "dir-0001")
    with pytest.raises(PathRejected, match="symlink"):
        state.last_directive(root)
    with pytest.raises(PathRejected, match="symlink"):
        state.archive_pstore(_pstore(tmp_path), root)
    assert tree_snapshot(outside) == before
    assert (tmp_path / "pstore/dmesg-ramoops-0").exists(), "records stay in pstore"


def test_a_symlinked_last_directive_is_not_read_or_renamed(os_root: Path, outside: Path) -> None:
    (outside / "precious").write_text("dir-evil\n")
    (os_root / LAST_DIRECTIVE).symlink_to(outside / "precious")
    with pytest.raises(PathRejected, match="symlink"):
        state.last_directive(os_root)
    with pytest.raises(PathRejected, match="not a regular file"):
        state.confirm_last_directive(os_root)
    assert (os_root / LAST_DIRECTIVE).is_symlink()
    assert not (os_root / CONFIRMED_DIRECTIVE).exists()


def test_a_symlink_at_confirmed_directive_is_replaced_not_followed(os_root: Path, outside: Path) -> None:
    (os_root / CONFIRMED_DIRECTIVE).symlink_to(outside / "precious")
    before = tree_snapshot(outside)
    state.record_applied(os_root, "dir-0002")
    assert state.confirm_last_directive(os_root)
    assert tree_snapshot(outside) == before
    assert not (os_root / CONFIRMED_DIRECTIVE).is_symlink()
    assert state.confirmed_directive(os_root) == "dir-0002"


def test_garbage_in_last_directive_is_ignored(os_root: Path) -> None:
    (os_root / LAST_DIRECTIVE).write_text("../../etc/passwd\n")
    assert state.last_directive(os_root) is None


def _pstore(tmp_path: Path) -> Path:
    pstore = tmp_path / "pstore"
    pstore.mkdir(exist_ok=True)
    record = pstore / "dmesg-ramoops-0"
    record.write_text("Panic#1 Part1\nKernel panic - not syncing: Fatal exception\n")
    record.chmod(0o440)
    os.utime(record, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    return pstore


def test_archive_pstore_moves_the_records_into_the_os_root(tmp_path: Path, os_root: Path) -> None:
    pstore = _pstore(tmp_path)
    assert state.archive_pstore(pstore, os_root) == 1
    assert not list(pstore.iterdir())
    [copy] = (os_root / PSTORE_ARCHIVE).glob("*/dmesg-ramoops-0")
    assert copy.read_text().startswith("Panic#1 Part1")
    assert copy.stat().st_mtime_ns == 1_700_000_000_000_000_000
    assert copy.stat().st_mode & 0o777 == 0o440
    assert state.archive_pstore(pstore, os_root) == 0
    assert state.archive_pstore(None, os_root) == 0


def test_a_symlinked_pstore_archive_is_refused(tmp_path: Path, os_root: Path, outside: Path) -> None:
    (os_root / PSTORE_ARCHIVE).symlink_to(outside / "dir")
    before = tree_snapshot(outside)
    with pytest.raises(PathRejected, match="symlink"):
        state.archive_pstore(_pstore(tmp_path), os_root)
    assert tree_snapshot(outside) == before
    assert (tmp_path / "pstore/dmesg-ramoops-0").exists(), "records stay in pstore"


def test_purge_needs_a_confirmed_directive_or_force(tmp_path: Path) -> None:
    root = build_root(tmp_path / "os")
    apply_directive(root, directive(QUARANTINE_BAD, directive_id="dir-0001"))
    state.record_applied(root, "dir-0001")
    with pytest.raises(state.NotConfirmed, match="confirmed-directive does not exist.*--force"):
        state.purge_quarantine(root, "dir-0001")
    assert list_quarantine(root)

    state.confirm_last_directive(root)
    state.purge_quarantine(root, "dir-0001")
    assert list_quarantine(root) == []
    assert journal(root)["state"] == "purged"


def test_purge_with_force_skips_the_confirmation(tmp_path: Path) -> None:
    root = build_root(tmp_path / "os")
    apply_directive(root, directive(QUARANTINE_BAD, directive_id="dir-0001"))
    (root / CONFIRMED_DIRECTIVE).write_text("dir-0000\n")
    with pytest.raises(state.NotConfirmed, match="names dir-0000"):
        state.purge_quarantine(root, "dir-0001")
    state.purge_quarantine(root, "dir-0001", force=True)
    assert list_quarantine(root) == []
