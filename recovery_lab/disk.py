"""The lab machine's disk layout and the pure-Python writers for it: the MBR partition table
(or a GPT, for the images the lab makes as a user's would be) and placing partition images and
GRUB's boot code at their offsets (what ``dd`` would do); and :func:`read_partitions`, which
reads either table back (a user's own disk image may have either).

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
import uuid
import zlib
from collections.abc import Callable, Sequence
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
TYPE_GPT_PROTECTIVE = 0xEE  # the one MBR entry of a GPT disk

# GPT partition type GUIDs (UEFI specification; the Discoverable Partitions Specification).
GPT_LINUX = "0fc63daf-8483-4772-8e79-3d69d8477de4"
GPT_EFI = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
GPT_BIOS_BOOT = "21686148-6449-6e6f-744e-656564454649"  # grub-pc's core.img on a GPT disk
GPT_ENTRIES = 128
GPT_ENTRY_SIZE = 128
GPT_ENTRY_SECTORS = GPT_ENTRIES * GPT_ENTRY_SIZE // SECTOR  # 32

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
    type_guid: str = ""  # on a GPT disk: the partition's type GUID (type_id is 0 there)

    @property
    def offset(self) -> int:
        return self.start * SECTOR

    @property
    def size(self) -> int:
        return self.sectors * SECTOR


def layout(sizes_mib: Sequence[tuple[str, int | str, int]]) -> list[Partition]:
    """Partitions placed one after another from sector 2048, each aligned to 1 MiB:
    ``sizes_mib`` is ``(name, type, size in MiB)`` per partition, the type an MBR type id
    or, for a GPT disk, a type GUID."""
    parts = []
    start = FIRST_LBA
    for number, (name, kind, mib) in enumerate(sizes_mib, start=1):
        sectors = mib * MIB // SECTOR
        if isinstance(kind, str):
            parts.append(Partition(number, name, 0, start, sectors, type_guid=kind))
        else:
            parts.append(Partition(number, name, kind, start, sectors, bootable=number == 1))
        start += sectors
    return parts


def partition_mib(name: str) -> int:
    """The size in MiB of the lab machine's partition ``name`` (esp, os, recovery)."""
    return next(mib for n, _, mib in PARTITIONS if n == name)


def disk_size(parts: Sequence[Partition], table: str = "mbr") -> int:
    """Bytes of a disk that holds ``parts``; a GPT disk ends with its backup table, rounded
    up to whole MiB."""
    end = max(p.start + p.sectors for p in parts) * SECTOR
    if table == "gpt":
        end += (1 + GPT_ENTRY_SECTORS) * SECTOR
        end = -(-end // MIB) * MIB
    return end


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
    _check_overlaps(parts)
    if parts and min(p.start for p in parts) < 1:
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


def _check_overlaps(parts: Sequence[Partition]) -> None:
    ordered = sorted(parts, key=lambda p: p.start)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.start + a.sectors > b.start:
            raise DiskError(f"partition {a.number} ({a.name}) overlaps partition {b.number} ({b.name})")


def _gpt_header(
    current: int, backup: int, last_usable: int, disk_guid: uuid.UUID, entries_lba: int, entries: bytes
) -> bytes:
    fields = [
        b"EFI PART",
        0x00010000,
        92,
        0,  # the header's CRC32, computed with this field zero
        0,
        current,
        backup,
        GPT_ENTRY_SECTORS + 2,  # first usable LBA: after the MBR, the header and the entries
        last_usable,
        disk_guid.bytes_le,
        entries_lba,
        GPT_ENTRIES,
        GPT_ENTRY_SIZE,
        zlib.crc32(entries),
    ]
    fmt = "<8sIIIIQQQQ16sQIII"
    header = struct.pack(fmt, *fields)
    fields[3] = zlib.crc32(header)
    return struct.pack(fmt, *fields).ljust(SECTOR, b"\0")


def gpt_tables(parts: Sequence[Partition], size: int, disk_guid: uuid.UUID) -> tuple[bytes, bytes]:
    """A GPT disk's first 34 sectors (protective MBR table, header, entries; the MBR's boot
    code left zero) and its last 33 (the backup entries, then the backup header), for a disk
    of ``size`` bytes. Unique partition GUIDs come from the disk GUID and the number, so an
    image is reproducible."""
    if len(parts) > GPT_ENTRIES:
        raise DiskError(f"a GPT holds {GPT_ENTRIES} partitions, not {len(parts)}")
    _check_overlaps(parts)
    last = size // SECTOR - 1
    last_usable = last - GPT_ENTRY_SECTORS - 1
    entries = bytearray(GPT_ENTRIES * GPT_ENTRY_SIZE)
    for p in parts:
        if p.start < GPT_ENTRY_SECTORS + 2 or p.start + p.sectors - 1 > last_usable:
            raise DiskError(f"partition {p.number} ({p.name}) is outside the GPT's usable sectors")
        if not p.type_guid:
            raise DiskError(f"partition {p.number} ({p.name}) has no GPT type GUID")
        unique = uuid.uuid5(disk_guid, str(p.number))
        name = p.name.encode("utf-16-le")[:72].ljust(72, b"\0")
        entry = struct.pack(
            "<16s16sQQQ72s",
            uuid.UUID(p.type_guid).bytes_le,
            unique.bytes_le,
            p.start,
            p.start + p.sectors - 1,
            0,
            name,
        )
        entries[(p.number - 1) * GPT_ENTRY_SIZE : p.number * GPT_ENTRY_SIZE] = entry
    entries_b = bytes(entries)
    sectors = min(last, 0xFFFFFFFF)
    protective = struct.pack(
        "<B3sB3sII", 0, b"\x00\x02\x00", TYPE_GPT_PROTECTIVE, b"\xfe\xff\xff", 1, sectors
    )
    mbr = bytes(446) + protective + bytes(48) + b"\x55\xaa"
    primary = mbr + _gpt_header(1, last, last_usable, disk_guid, 2, entries_b) + entries_b
    backup = entries_b + _gpt_header(last, 1, last_usable, disk_guid, last - GPT_ENTRY_SECTORS, entries_b)
    return primary, backup


def parse_gpt(read: Callable[[int, int], bytes]) -> list[Partition]:
    """The partitions of a GPT disk; ``read(offset, length)`` reads the disk. The primary
    header and its entries are checked against their CRC32s."""
    header = read(SECTOR, SECTOR)
    if header[:8] != b"EFI PART":
        raise DiskError("the MBR says GPT but sector 1 has no GPT header ('EFI PART')")
    (_, _, size, crc, _, _, _, _, _, _, entries_lba, count, entry_size, entries_crc) = struct.unpack(
        "<8sIIIIQQQQ16sQIII", header[:92]
    )
    if not 92 <= size <= SECTOR or entry_size < 128 or count > 4096:
        raise DiskError(
            f"the GPT header is not one this reader knows (size {size}, entries {count}x{entry_size})"
        )
    if zlib.crc32(header[:16] + b"\0\0\0\0" + header[20:size]) != crc:
        raise DiskError("the GPT header's CRC32 does not match: the partition table is damaged")
    entries = read(entries_lba * SECTOR, count * entry_size)
    if zlib.crc32(entries) != entries_crc:
        raise DiskError("the GPT entries' CRC32 does not match: the partition table is damaged")
    parts = []
    for i in range(count):
        e = entries[i * entry_size : i * entry_size + 128]
        type_le, _, first, last, _, name = struct.unpack("<16s16sQQQ72s", e)
        if type_le == bytes(16):
            continue
        label = name.decode("utf-16-le", "replace").split("\0")[0] or f"p{i + 1}"
        type_guid = str(uuid.UUID(bytes_le=type_le))
        parts.append(Partition(i + 1, label, 0, first, last - first + 1, type_guid=type_guid))
    return parts


def read_partitions(image: Path) -> tuple[str, list[Partition]]:
    """``("mbr" | "gpt", partitions)`` of a raw disk image."""
    with open(image, "rb") as f:

        def read(offset: int, length: int) -> bytes:
            f.seek(offset)
            data = f.read(length)
            if len(data) != length:
                raise DiskError(f"{image} ends before its partition table does: is it a whole disk?")
            return data

        sector0 = read(0, SECTOR)
        parts = parse_mbr(sector0)
        if any(p.type_id == TYPE_GPT_PROTECTIVE for p in parts):
            return "gpt", parse_gpt(read)
        return "mbr", parts


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
    table: str = "mbr",
    disk_guid: uuid.UUID | None = None,
) -> None:
    """Write a raw disk image: MBR (boot.img code + table), core.img at sector 1, and each
    partition image at its offset. Without ``boot_img`` and ``core_img`` the boot code is
    left empty (for a bootloader installed later from inside the machine, by grub-install).
    ``table="gpt"``: a GPT (with ``disk_guid``) instead, and no boot code (grub-install puts
    it in a BIOS boot partition)."""
    if table == "gpt":
        if boot_img is not None or core_img is not None:
            raise DiskError("a GPT disk's boot code is grub-install's to write: pass no boot.img or core.img")
        _assemble_gpt(out, parts, images, disk_guid or uuid.UUID(int=DISK_SIGNATURE))
        return
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
            if p.number in images:  # (a partition without an image is left zero)
                _copy_sparse(images[p.number], fd, p.offset, p.size)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, out)


def _assemble_gpt(
    out: Path, parts: Sequence[Partition], images: dict[int, Path], disk_guid: uuid.UUID
) -> None:
    size = disk_size(parts, "gpt")
    primary, backup = gpt_tables(parts, size, disk_guid)
    tmp = out.with_name(out.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, primary, 0)
        os.pwrite(fd, backup, size - len(backup))
        for p in parts:
            if p.number in images:
                _copy_sparse(images[p.number], fd, p.offset, p.size)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, out)
