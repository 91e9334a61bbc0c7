"""inventory: what the agent reports about the OS root."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest

from recovery_agent.inventory import (
    InventoryError,
    collect_channel_files,
    collect_driver_store,
    collect_drivers,
    collect_system,
    kernel_version,
    recent_changes,
)
from recovery_agent.protocol.wire import FileRecord

KVER = "6.1.0-27-amd64"


def fake_module(modinfo: list[str], text: bytes = b"\x90" * 64) -> bytes:
    """A minimal ELF64 relocatable file with ``.text``, ``.modinfo`` and ``.shstrtab``, the
    layout of a kernel module as far as ``.modinfo`` goes (modinfo's first entry, as in a real
    .ko, is not preceded by a NUL)."""
    modinfo_data = b"".join(e.encode() + b"\x00" for e in modinfo)
    shstrtab = b"\x00.text\x00.modinfo\x00.shstrtab\x00"
    body = text + modinfo_data + shstrtab
    text_off, modinfo_off = 64, 64 + len(text)
    shstr_off = modinfo_off + len(modinfo_data)
    shoff = 64 + len(body)
    shoff += (-shoff) % 8
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\x00" * 8
    ehdr += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 4, 3)

    def sh(name: int, type_: int, off: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, type_, 0, 0, off, size, 0, 0, 1, 0)

    sections = (
        sh(0, 0, 0, 0)
        + sh(1, 1, text_off, len(text))
        + sh(7, 1, modinfo_off, len(modinfo_data))
        + sh(16, 3, shstr_off, len(shstrtab))
    )
    data = ehdr + body
    return data + b"\x00" * (shoff - len(data)) + sections


def write(root: Path, rel: str, data: bytes | str, mtime: float | None = None) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def os_root(tmp_path: Path) -> Path:
    root = tmp_path / "os"
    write(
        root, "usr/lib/os-release", 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\n'
    )
    (root / "etc").mkdir()
    os.symlink("../usr/lib/os-release", root / "etc/os-release")
    write(root, "etc/hostname", "lab-machine-7\n")
    write(
        root,
        f"lib/modules/{KVER}/extra/sensor.ko",
        fake_module(["version=1.1", "license=GPL", "srcversion=ABC", "name=sensor"]),
        1000,
    )
    write(root, f"lib/modules/{KVER}/updates/dkms/other.ko", fake_module(["license=GPL", "name=other"]), 1100)
    write(root, f"lib/modules/{KVER}/kernel/drivers/in_tree.ko", fake_module(["version=9"]))
    (root / "lib/modules/6.1.0-9-amd64").mkdir(parents=True)  # an older kernel, no extra/
    write(root, "var/lib/driver-store/sensor/1.0/sensor.ko", fake_module(["version=1.0"]), 500)
    write(root, "var/lib/driver-store/sensor/1.1/sensor.ko", fake_module(["version=1.1"]), 900)
    write(root, "var/lib/sensor/channels/C-00000291-00000000-00000031.sys", b"CHNL good", 2000)
    write(root, "var/lib/sensor/channels/C-00000291-00000000-00000032.sys", b"CHNL bad", 3000)
    write(root, "var/lib/sensor/channels/README", b"not a channel file", 4000)
    return root


def test_collect_system(os_root: Path) -> None:
    info = collect_system(os_root)
    assert info.os_release == "Debian GNU/Linux 12 (bookworm)"  # symlinked etc/os-release
    assert info.kernel_version == KVER  # the one with extra/
    assert info.hostname == "lab-machine-7"


def test_kernel_version_from_boot(tmp_path: Path) -> None:
    write(tmp_path, "boot/vmlinuz-6.1.0-9-amd64", b"k")
    write(tmp_path, "boot/vmlinuz-6.1.0-27-amd64", b"k")
    write(tmp_path, "boot/initrd.img-6.1.0-30-amd64", b"i")
    assert kernel_version(tmp_path) == "6.1.0-27-amd64"  # natural order, not 6.1.0-9
    assert collect_system(tmp_path).os_release == ""


def test_kernel_version_with_a_digit_int_cannot_read(tmp_path: Path) -> None:
    """A superscript one is a digit to str.isdigit and not to int (hypothesis found it in
    test_agent_properties): the name sorts as text, the inventory is still made."""
    write(tmp_path, "boot/vmlinuz-6.1.0-9-amd64", b"k")
    write(tmp_path, "boot/vmlinuz-6.1.0-9¹", b"k")
    assert kernel_version(tmp_path) == "6.1.0-9¹"  # 9 then text, after 9 alone


def test_merged_usr(tmp_path: Path) -> None:
    write(tmp_path, f"usr/lib/modules/{KVER}/extra/sensor.ko", fake_module(["version=2.0"]))
    os.symlink("usr/lib", tmp_path / "lib")
    assert kernel_version(tmp_path) == KVER
    [driver] = collect_drivers(tmp_path)
    assert driver.path == f"usr/lib/modules/{KVER}/extra/sensor.ko"
    assert driver.version == "2.0"


def test_collect_drivers(os_root: Path) -> None:
    drivers = collect_drivers(os_root)
    assert [(d.path, d.version) for d in drivers] == [
        (f"lib/modules/{KVER}/extra/sensor.ko", "1.1"),
        (f"lib/modules/{KVER}/updates/dkms/other.ko", None),
    ]
    data = (os_root / f"lib/modules/{KVER}/extra/sensor.ko").read_bytes()
    assert drivers[0].sha256 == hashlib.sha256(data).hexdigest()
    assert drivers[0].size == len(data)
    assert drivers[0].mtime == 1000


def test_version_by_scan_when_not_elf(tmp_path: Path) -> None:
    write(tmp_path, f"lib/modules/{KVER}/extra/odd.ko", b"junk\x00version=3.4-rc1\x00name=odd\x00")
    [driver] = collect_drivers(tmp_path)
    assert driver.version == "3.4-rc1"


def test_collect_driver_store(os_root: Path) -> None:
    store = collect_driver_store(os_root)
    assert [(r.path, r.version) for r in store] == [
        ("var/lib/driver-store/sensor/1.0/sensor.ko", "1.0"),
        ("var/lib/driver-store/sensor/1.1/sensor.ko", "1.1"),
    ]


def test_collect_channel_files(os_root: Path) -> None:
    channels = collect_channel_files(os_root)
    assert [c.path for c in channels] == [
        "var/lib/sensor/channels/C-00000291-00000000-00000031.sys",
        "var/lib/sensor/channels/C-00000291-00000000-00000032.sys",
    ]
    assert channels[1].sha256 == hashlib.sha256(b"CHNL bad").hexdigest()
    assert channels[1].version is None


def test_recent_changes(os_root: Path) -> None:
    records = collect_drivers(os_root) + collect_driver_store(os_root) + collect_channel_files(os_root)
    recent = recent_changes(records, limit=3)
    assert [r.path for r in recent] == [
        "var/lib/sensor/channels/C-00000291-00000000-00000032.sys",
        "var/lib/sensor/channels/C-00000291-00000000-00000031.sys",
        f"lib/modules/{KVER}/updates/dkms/other.ko",
    ]
    assert len(recent_changes(records)) == len(records) == 6
    assert recent_changes(records, limit=0) == []


def test_symlinks_and_special_files_are_never_followed(tmp_path: Path) -> None:
    secret = tmp_path / "recovery-env-secret.key"
    secret.write_bytes(b"do not hash me")
    root = tmp_path / "os"
    channels = root / "var/lib/sensor/channels"
    channels.mkdir(parents=True)
    os.symlink(secret, channels / "C-00000001-link.sys")
    os.mkfifo(channels / "C-00000002-fifo.sys")  # would block a reader that opened it
    (channels / "C-00000003-dir.sys").mkdir()
    write(root, "var/lib/sensor/channels/C-00000004-real.sys", b"real")
    assert [c.path for c in collect_channel_files(root)] == ["var/lib/sensor/channels/C-00000004-real.sys"]

    # A symlinked directory on the way is not entered either.
    (tmp_path / "elsewhere/extra").mkdir(parents=True)
    write(tmp_path, "elsewhere/extra/evil.ko", fake_module(["version=6.6.6"]))
    (root / "lib/modules").mkdir(parents=True)
    os.symlink(tmp_path / "elsewhere", root / f"lib/modules/{KVER}")
    assert collect_drivers(root) == []
    os.symlink(tmp_path / "elsewhere", root / "var/lib/driver-store")
    assert collect_driver_store(root) == []


def test_large_file_hashed_in_chunks(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    write(tmp_path, "var/lib/sensor/channels/C-big.sys", data)
    [rec] = collect_channel_files(tmp_path)
    assert rec.sha256 == hashlib.sha256(data).hexdigest()
    assert rec.size == len(data)


def test_missing_parts_give_empty_lists(tmp_path: Path) -> None:
    assert collect_drivers(tmp_path) == []
    assert collect_driver_store(tmp_path) == []
    assert collect_channel_files(tmp_path) == []
    assert collect_system(tmp_path).kernel_version == ""


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="does not exist: mount the OS partition"):
        collect_system(tmp_path / "not-mounted")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InventoryError, match="is not a directory"):
        collect_channel_files(tmp_path / "file")


def test_records_are_wire_records(os_root: Path) -> None:
    for rec in collect_drivers(os_root) + collect_channel_files(os_root):
        assert isinstance(rec, FileRecord)
        assert not rec.path.startswith("/")
