"""Read what a run left on a machine's disk, from outside the VM and without mounting.

A run's writes live in its qcow2 overlay; ``DiskImage`` flattens it to a raw file (sparse,
so a 400 MiB disk costs what was written), finds the partitions from the MBR or the GPT, and reads:
files on the FAT ESP through mtools (``grub/grubenv``), and files and folders on the ext4 OS
and recovery partitions through debugfs, both at the partition's offset in the file. No loop
device, no root needed, nothing is written to the image.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from recovery_agent.bootenv import BootEnv

from . import tools
from .disk import DiskError, Partition, read_partitions

# Partition numbers, for the methods that take one.
ESP, OS = 1, 2


class DiskImage:
    """A lab disk image (raw, or a run's qcow2 overlay, flattened to a temporary raw copy),
    read without mounting. Use ``with DiskImage(path) as disk:``; leaving removes the copy.
    Raises :class:`~recovery_lab.disk.DiskError` for a disk without the lab's partitions and
    :class:`~recovery_lab.tools.ToolError` when a tool is missing or fails."""

    def __init__(
        self,
        image: Path,
        grubenv_at: tuple[int, str] | None = None,
        volumes: dict[int, bytes] | None = None,
    ) -> None:
        """``grubenv_at``: (partition, path) of grubenv on an ext4 /boot, for a disk whose
        grubenv is not on the FAT ESP (the Debian base). ``volumes``: partitions that are
        LUKS2 volumes, with the lab's volume key (the encrypted base): their filesystem is read
        from a decrypted copy (``build.luksimage``), made once."""
        self.source = Path(image)
        self.grubenv_at = grubenv_at
        self.volumes = dict(volumes or {})
        self._plain: dict[int, Path] = {}
        self._tmp = Path(tempfile.mkdtemp(prefix="qmr-inspect-"))
        if self.source.suffix == ".qcow2":
            tools.require("qemu-img")
            self.raw = self._tmp / "disk.raw"
            tools.run(["qemu-img", "convert", "-O", "raw", str(self.source), str(self.raw)])
        else:
            self.raw = self.source
        self.table, found = read_partitions(self.raw)
        self.partitions = {p.number: p for p in found}

    def __enter__(self) -> DiskImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _part(self, number: int) -> Partition:
        try:
            return self.partitions[number]
        except KeyError:
            raise DiskError(f"{self.source} has no partition {number}: is it a disk the lab built?") from None

    def esp_file(self, path: str) -> bytes:
        tools.require("mcopy")
        out = self._tmp / "esp-file"
        part = self._part(ESP)
        tools.run(["mcopy", "-n", "-o", "-i", f"{self.raw}@@{part.offset}", f"::{path}", str(out)])
        return out.read_bytes()

    def grubenv(self) -> BootEnv:
        if self.grubenv_at is not None:
            number, path = self.grubenv_at
            data = self.ext4_file(number, path)
            if data is None:
                raise DiskError(f"{self.source} has no {path} on partition {number}")
            return BootEnv.from_bytes(data, where=f"{self.source} p{number} {path}")
        return BootEnv.from_bytes(self.esp_file("grub/grubenv"), where=f"{self.source} grub/grubenv")

    def _ext4(self, number: int) -> str:
        if number in self.volumes:
            if number not in self._plain:
                from .build.luksimage import decrypt_to

                part = self._part(number)
                plain = self._tmp / f"p{number}.plain"
                decrypt_to(self.raw, part.offset, part.size, self.volumes[number], plain)
                self._plain[number] = plain
            return str(self._plain[number])
        # libext2fs reads a filesystem at an offset in a file ("image?offset=N"): no copy.
        return f"{self.raw}?offset={self._part(number).offset}"

    def ext4_file(self, number: int, path: str) -> bytes | None:
        """The file's bytes, or None if it does not exist."""
        tools.require("debugfs")
        out = self._tmp / "ext4-file"
        out.unlink(missing_ok=True)
        tools.run(["debugfs", "-R", f"dump -p /{path.lstrip('/')} {out}", self._ext4(number)])
        return out.read_bytes() if out.exists() else None

    def ext4_rdump(self, number: int, dest: Path) -> Path:
        """Copy the whole filesystem into the empty folder ``dest`` (debugfs rdump, no mount;
        modes kept); return ``dest``."""
        tools.require("debugfs")
        Path(dest).mkdir(parents=True, exist_ok=True)
        tools.run(["debugfs", "-R", f"rdump / {dest}", self._ext4(number)])
        return Path(dest)

    def ext4_listdir(self, number: int, path: str) -> list[str]:
        """Names in a folder (without . and ..), or [] if it does not exist."""
        tools.require("debugfs")
        text = tools.run(["debugfs", "-R", f"ls -p /{path.lstrip('/')}", self._ext4(number)])
        names = []
        for line in text.splitlines():
            m = re.match(r"^/\d+/\d+/\d+/\d+/(.*)/\d*/$", line.strip())
            if m and m.group(1) not in (".", ".."):
                names.append(m.group(1))
        return names
