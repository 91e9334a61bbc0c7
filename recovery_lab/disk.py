"""The lab machine's disk layout and the pure-Python writers for it: the MBR partition table
and placing partition images and GRUB's boot code at their offsets (what ``dd`` would do).

Layout (512-byte sectors)::

    sector 0        MBR: GRUB boot.img (first 440 bytes), disk signature, partition table
    sector 1..2047  GRUB core.img (must end below the first partition)
    p1  FAT         ESP: grub/grub.cfg, grub/grubenv
    p2  ext4        the OS root
    p3  ext4        the recovery environment
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import LabError

SECTOR = 512
FIRST_LBA = 2048
MIB = 1024 * 1024
MBR_BOOT_CODE = 440
DISK_SIGNATURE = 0x514D5231  # "QMR1"; fixed so images are reproducible

TYPE_FAT16_LBA = 0x0E
TYPE_LINUX = 0x83
TYPE_EFI = 0xEF  # an EFI system partition on an MBR disk (UEFI firmware looks there)

# The lab machine's partitions, in disk order: (name, MBR type, size in MiB).
PARTITIONS = [
    ("esp", TYPE_FAT16_LBA, 32),
    ("os", TYPE_LINUX, 192),
    ("recovery", TYPE_LINUX, 192),
]


class DiskError(LabError):
    """Raised when a layout does not fit (overlapping partitions, a partition image larger
    than its slot, a core.img that would run into the first partition) or when a disk is not
    laid out as the lab's are (no MBR, a partition missing)."""


@dataclass(frozen=True)
class Partition:
    number: int
    name: str
    type_id: int
    start: int  # first sector
    sectors: int
    bootable: bool = False

    @property
    def offset(self) -> int:
        return self.start * SECTOR

    @property
    def size(self) -> int:
        return self.sectors * SECTOR


def layout(sizes_mib: Sequence[tuple[str, int, int]]) -> list[Partition]:
    """Partitions placed one after another from sector 2048, each aligned to 1 MiB:
    ``sizes_mib`` is ``(name, type_id, size in MiB)`` per partition."""
    parts = []
    start = FIRST_LBA
    for number, (name, type_id, mib) in enumerate(sizes_mib, start=1):
        sectors = mib * MIB // SECTOR
        parts.append(Partition(number, name, type_id, start, sectors, bootable=number == 1))
        start += sectors
    return parts


def partition_mib(name: str) -> int:
    """The size in MiB of the lab machine's partition ``name`` (esp, os, recovery)."""
    return next(mib for n, _, mib in PARTITIONS if n == name)


def disk_size(parts: Sequence[Partition]) -> int:
    return max(p.start + p.sectors for p in parts) * SECTOR


def _chs(lba: int) -> bytes:
    # Disks this large have no meaningful CHS; LBA is what every reader uses. Write the
    # conventional "beyond 1024 cylinders" value, as sfdisk does for such offsets.
    if lba >= 1024 * 255 * 63:
        return b"\xfe\xff\xff"
    cyl, rem = divmod(lba, 255 * 63)
    head, sec = divmod(rem, 63)
    return bytes([head, ((cyl >> 2) & 0xC0) | (sec + 1), cyl & 0xFF])


def mbr_table(parts: Sequence[Partition], signature: int = DISK_SIGNATURE) -> bytes:
    """Bytes 440..511 of the MBR: disk signature, 2 zero bytes, 4 entries, 0x55AA."""
    if len(parts) > 4:
        raise DiskError(f"an MBR holds 4 primary partitions, not {len(parts)}")
    ordered = sorted(parts, key=lambda p: p.start)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.start + a.sectors > b.start:
            raise DiskError(f"partition {a.number} ({a.name}) overlaps partition {b.number} ({b.name})")
    if ordered and ordered[0].start < 1:
        raise DiskError("a partition cannot start at sector 0 (the MBR)")
    entries = b""
    for number in range(1, 5):
        p = next((p for p in parts if p.number == number), None)
        if p is None:
            entries += bytes(16)
            continue
        if p.start + p.sectors > 0xFFFFFFFF:
            raise DiskError(f"partition {p.number} ends past 2 TiB: MBR cannot address it")
        entries += struct.pack(
            "<B3sB3sII",
            0x80 if p.bootable else 0,
            _chs(p.start),
            p.type_id,
            _chs(p.start + p.sectors - 1),
            p.start,
            p.sectors,
        )
    return struct.pack("<IH", signature, 0) + entries + b"\x55\xaa"


def parse_mbr(sector0: bytes) -> list[Partition]:
    """Read the partition entries back (for tests and checks)."""
    if sector0[510:512] != b"\x55\xaa":
        raise DiskError("no MBR signature 0x55AA")
    parts = []
    for i in range(4):
        e = sector0[446 + 16 * i : 446 + 16 * (i + 1)]
        status, _, type_id, _, start, sectors = struct.unpack("<B3sB3sII", e)
        if type_id:
            parts.append(Partition(i + 1, f"p{i + 1}", type_id, start, sectors, status == 0x80))
    return parts


def _copy_sparse(src: Path, dst_fd: int, offset: int, limit: int) -> None:
    """Copy ``src`` into ``dst_fd`` at ``offset``, skipping all-zero blocks so the image
    stays sparse (the destination was created empty)."""
    size = src.stat().st_size
    if size > limit:
        raise DiskError(f"{src.name} is {size} bytes, larger than its {limit}-byte slot")
    block = 1 << 20
    zero = bytes(block)
    with open(src, "rb") as f:
        pos = 0
        while chunk := f.read(block):
            if chunk != zero[: len(chunk)]:
                os.pwrite(dst_fd, chunk, offset + pos)
            pos += len(chunk)


def assemble(
    out: Path,
    parts: Sequence[Partition],
    images: dict[int, Path],
    boot_img: Path | None,
    core_img: Path | None,
) -> None:
    """Write a raw disk image: MBR (boot.img code + table), core.img at sector 1, and each
    partition image at its offset. Without ``boot_img`` and ``core_img`` the boot code is
    left empty (for a bootloader installed later from inside the machine, by grub-install)."""
    boot = boot_img.read_bytes() if boot_img is not None else bytes(SECTOR)
    if len(boot) != SECTOR:
        raise DiskError(f"{boot_img} is {len(boot)} bytes, expected {SECTOR}: reinstall grub-pc-bin")
    core_limit = (min(p.start for p in parts) - 1) * SECTOR
    if core_img is not None and core_img.stat().st_size > core_limit:
        raise DiskError(
            f"core.img is {core_img.stat().st_size} bytes and does not fit in the "
            f"{core_limit} bytes before the first partition: embed fewer modules"
        )
    tmp = out.with_name(out.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, disk_size(parts))
        os.pwrite(fd, boot[:MBR_BOOT_CODE] + mbr_table(parts), 0)
        if core_img is not None:
            _copy_sparse(core_img, fd, SECTOR, core_limit)
        for p in parts:
            _copy_sparse(images[p.number], fd, p.offset, p.size)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, out)
