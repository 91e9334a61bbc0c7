"""The per-run seed disk (recovery_lab.seed): a FAT image with the agent's settings and key."""

from __future__ import annotations

import json
import shutil

import pytest

from recovery_lab.seed import SEED_LABEL, SEED_SIZE_KIB, make_seed_disk, rewrite_seed_disk
from recovery_lab.tools import run

pytestmark = pytest.mark.skipif(
    not (shutil.which("mkfs.fat") or shutil.which("/sbin/mkfs.fat")) or not shutil.which("mcopy"),
    reason="needs dosfstools and mtools",
)

ENV = {"MTOOLS_SKIP_CHECK": "1"}


def test_seed_disk_holds_the_files_and_the_label(tmp_path):
    settings = json.dumps({"device_id": "lab-0001", "server_url": "http://10.0.2.100:8080"}).encode()
    key = b"-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----\n"
    out = make_seed_disk(tmp_path / "seed.img", {"agent.json": settings, "device.key": key})
    assert out == tmp_path / "seed.img"
    assert out.stat().st_size == SEED_SIZE_KIB * 1024
    assert out.read_bytes()[0x2B : 0x2B + 11] == SEED_LABEL.ljust(11).encode()  # FAT12/16 BPB label
    listing = run(["mdir", "-b", "-i", out, "::"], env=ENV)
    assert sorted(line.strip().removeprefix("::/") for line in listing.splitlines() if line.strip()) == [
        "agent.json",
        "device.key",
    ]
    for name, data in (("agent.json", settings), ("device.key", key)):
        copy = tmp_path / f"out-{name}"
        run(["mcopy", "-n", "-i", out, f"::{name}", copy], env=ENV)
        assert copy.read_bytes() == data


def test_seed_disk_is_replaced_not_appended(tmp_path):
    out = tmp_path / "seed.img"
    make_seed_disk(out, {"agent.json": b"{}", "old.txt": b"x"})
    make_seed_disk(out, {"agent.json": b'{"a": 1}'})
    listing = run(["mdir", "-b", "-i", out, "::"], env=ENV)
    assert "old.txt" not in listing


@pytest.mark.parametrize("name", ["../x", "sub/agent.json", "", ".hidden"])
def test_seed_disk_refuses_bad_names(tmp_path, name):
    with pytest.raises(ValueError):
        make_seed_disk(tmp_path / "seed.img", {name: b"x"})


def test_seed_disk_refuses_too_much(tmp_path):
    with pytest.raises(ValueError):
        make_seed_disk(tmp_path / "seed.img", {"big.bin": b"\0" * (SEED_SIZE_KIB * 1024)})


def test_a_seed_disk_is_rewritten_in_place_keeping_the_other_files(tmp_path):
    """The power-loss fault moves the agent's hold between boots while QEMU holds the file open."""
    out = make_seed_disk(
        tmp_path / "seed.img", {"agent.json": b'{"lab_hold_at": "journal"}', "device.key": b"k"}
    )
    inode = out.stat().st_ino
    rewrite_seed_disk(out, {"agent.json": b'{"lab_hold_at": "moved"}'})
    assert out.stat().st_ino == inode and out.stat().st_size == SEED_SIZE_KIB * 1024
    for name, data in (("agent.json", b'{"lab_hold_at": "moved"}'), ("device.key", b"k")):
        copy = tmp_path / f"out-{name}"
        run(["mcopy", "-n", "-i", out, f"::{name}", copy], env=ENV)
        assert copy.read_bytes() == data
