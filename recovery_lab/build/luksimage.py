"""LUKS2 partitions for the lab's encrypted Debian base, made and read from the lab's host.

The header and the keyslot are ``cryptsetup luksFormat``'s own, on a plain file (no
device-mapper: cryptsetup encrypts the keyslot through the kernel's crypto API). The data area
is another matter: the lab's host may have no device-mapper (a container, a VM without the
module), so the lab encrypts and decrypts it itself, in dm-crypt's format for the one cipher it
formats with (``aes-xts-plain64``, 512-byte sectors: sector *n* of the data area is AES-XTS
with the 512-bit volume key and the tweak *n*, little-endian). The guest's kernel reads it with
dm-crypt: every boot of an encrypted image checks this module.

The lab chooses the volume key (``--volume-key-file``) and keeps it in the build cache, so that
it can write a scenario's fault into the root filesystem and read what a run left there. A
machine's own keys are the keyslots': the normal boot's (the lab's emulated TPM,
:mod:`~recovery_lab.build.debian`) and the recovery key QMR adds at install.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..tools import run

CIPHER = "aes-xts-plain64"
SECTOR = 512
# Where the data area starts (cryptsetup --offset, in 512-byte sectors): 16 MiB, LUKS2's
# default header and keyslots area, pinned so the lab need not read the header back.
DATA_OFFSET_SECTORS = 32768
DATA_OFFSET = DATA_OFFSET_SECTORS * SECTOR
VOLUME_KEY_BYTES = 64  # AES-256-XTS: two 256-bit keys
# The keyslot's key derivation, pinned as QMR pins its own keyslot's (recovery_agent/luks.py): a
# TCG guest with 1 GiB opens it in seconds, where cryptsetup's benchmark on the host would pick
# a cost that takes a minute there.
PBKDF = ["--pbkdf", "argon2id", "--pbkdf-memory", "65536", "--pbkdf-parallel", "1"]
PBKDF += ["--pbkdf-force-iterations", "4"]
CHUNK = 1 << 20


def format_luks(
    out: Path, size_mib: int, uuid: str, unlock_key: bytes, volume_key: bytes, scratch: Path
) -> None:
    """Make ``out``, a LUKS2 volume of ``size_mib`` MiB with ``volume_key`` and one keyslot
    (0) opened by ``unlock_key``; its data area is left empty (:func:`encrypt_into`)."""
    with open(out, "wb") as f:
        f.truncate(size_mib * 1024 * 1024)
    vk = scratch / "volume-key.tmp"
    vk.write_bytes(volume_key)
    vk.chmod(0o600)
    try:
        run(
            [
                "cryptsetup",
                "luksFormat",
                "--batch-mode",
                "--type",
                "luks2",
                "--cipher",
                CIPHER,
                "--key-size",
                str(VOLUME_KEY_BYTES * 8),
                "--sector-size",
                str(SECTOR),
                "--offset",
                str(DATA_OFFSET_SECTORS),
                "--uuid",
                uuid,
                "--volume-key-file",
                str(vk),
                "--key-file",
                "-",
                *PBKDF,
                str(out),
            ],
            input=unlock_key,
        )
    finally:
        vk.unlink(missing_ok=True)


def _xts(volume_key: bytes, sector: int, data: bytes, encrypt: bool) -> bytes:
    mode = modes.XTS(sector.to_bytes(16, "little"))
    cipher = Cipher(algorithms.AES(volume_key), mode)
    op = cipher.encryptor() if encrypt else cipher.decryptor()
    return op.update(data) + op.finalize()


def _crypt_chunk(volume_key: bytes, first_sector: int, data: bytes, encrypt: bool) -> bytes:
    return b"".join(
        _xts(volume_key, first_sector + i // SECTOR, data[i : i + SECTOR], encrypt)
        for i in range(0, len(data), SECTOR)
    )


def encrypt_into(plain: Path, volume: Path, volume_key: bytes) -> None:
    """Write the filesystem image ``plain`` into the data area of ``volume``, encrypted. Every
    sector of ``plain`` is written, its holes too (a hole is zeros the filesystem relies on)."""
    size = plain.stat().st_size
    if size % SECTOR or DATA_OFFSET + size > volume.stat().st_size:
        raise ValueError(f"{plain} ({size} bytes) does not fit the data area of {volume}")
    encrypt_back(plain, volume, 0, volume_key)


def decrypt_to(volume: Path, offset: int, length: int, volume_key: bytes, out: Path) -> None:
    """The plaintext of the data area of the LUKS2 volume at ``offset`` (``length`` bytes, its
    header included) in a disk image, into ``out`` (sparse where it is zeros)."""
    data_len = length - DATA_OFFSET
    zero = bytes(CHUNK)
    with open(volume, "rb") as src, open(out, "wb") as dst:
        dst.truncate(data_len)
        src.seek(offset + DATA_OFFSET)
        done = 0
        while done < data_len:
            data = src.read(min(CHUNK, data_len - done))
            if not data:
                break
            plain = _crypt_chunk(volume_key, done // SECTOR, data, encrypt=False)
            if plain != zero[: len(plain)]:
                dst.seek(done)
                dst.write(plain)
            done += len(data)


def encrypt_back(plain: Path, image: Path, offset: int, volume_key: bytes) -> None:
    """Write ``plain`` (from :func:`decrypt_to`, changed) back into the LUKS2 volume at
    ``offset`` in the disk image ``image``, encrypted."""
    with open(plain, "rb") as src, open(image, "r+b") as dst:
        dst.seek(offset + DATA_OFFSET)
        sector = 0
        while data := src.read(CHUNK):
            dst.write(_crypt_chunk(volume_key, sector, data, encrypt=True))
            sector += len(data) // SECTOR
        dst.flush()
        os.fsync(dst.fileno())
