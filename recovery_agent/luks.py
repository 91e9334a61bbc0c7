"""LUKS2 through ``cryptsetup``, with every key on a pipe (``--key-file -``), never in a file
or on a command line.

- ``add_keyslot``: add QMR's recovery key in its own keyslot, unlocked by a key the machine
  already has (its normal-boot key: a TPM's, or in the lab the emulation of one). The
  key-derivation cost is pinned (``PBKDF``: argon2id, 64 MiB, 4 passes, 1 thread) rather than
  benchmarked on the machine that makes the slot, so a 1 GiB recovery environment on a slow
  CPU opens it in about a second whatever machine made it.
- ``used_slots``: the keyslots that hold a key (a rotation adds the new key in a free one).
- ``check_key``: whether a key opens a keyslot (``--test-passphrase``: no device-mapper).
- ``open_volume`` / ``close_volume``: map the volume for the recovery environment to mount,
  and unmap it once the fix is applied.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from .errors import AgentError

PBKDF = [
    "--pbkdf",
    "argon2id",
    "--pbkdf-memory",
    "65536",
    "--pbkdf-parallel",
    "1",
    "--pbkdf-force-iterations",
    "4",
]
TIMEOUT_S = 120


class LuksError(AgentError):
    """Raised when cryptsetup is missing, or refuses (the message is its own, and the fix)."""


def _cryptsetup(args: list[str], key: bytes | bytearray | None = None) -> subprocess.CompletedProcess[bytes]:
    exe = shutil.which("cryptsetup") or shutil.which("cryptsetup", path="/usr/sbin:/sbin")
    if exe is None:
        raise LuksError("cryptsetup is not installed: apt-get install cryptsetup-bin")
    return subprocess.run(
        [exe, *args],
        input=bytes(key) if key is not None else None,
        capture_output=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def _fail(what: str, proc: subprocess.CompletedProcess[bytes]) -> LuksError:
    said = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()
    return LuksError(
        f"cryptsetup could not {what} (exit {proc.returncode}): {said[-1] if said else 'no message'}"
    )


def add_keyslot(device: Path, unlock_key_file: Path, new_key: bytes | bytearray, slot: int) -> None:
    """Add ``new_key`` in ``slot`` of the LUKS2 volume ``device``, unlocked by the key in
    ``unlock_key_file`` (the machine's own)."""
    proc = _cryptsetup(
        [
            "luksAddKey",
            "--batch-mode",
            "--key-file",
            str(unlock_key_file),
            "--new-keyfile",
            "-",
            "--new-key-slot",
            str(slot),
            *PBKDF,
            str(device),
        ],
        new_key,
    )
    if proc.returncode != 0:
        raise _fail(f"add keyslot {slot} to {device}", proc)


def remove_keyslot(device: Path, unlock_key_file: Path, slot: int) -> None:
    proc = _cryptsetup(
        ["luksKillSlot", "--batch-mode", "--key-file", str(unlock_key_file), str(device), str(slot)]
    )
    if proc.returncode != 0:
        raise _fail(f"remove keyslot {slot} of {device}", proc)


def used_slots(device: Path) -> set[int]:
    """The keyslots of ``device`` that hold a key (``cryptsetup luksDump``)."""
    proc = _cryptsetup(["luksDump", str(device)])
    if proc.returncode != 0:
        raise _fail(f"read the header of {device}", proc)
    text = proc.stdout.decode(errors="replace")
    section = text.split("Keyslots:", 1)[1].split("Tokens:", 1)[0] if "Keyslots:" in text else ""
    return {int(m) for m in re.findall(r"^\s{2}(\d+): luks2", section, re.M)}


def check_key(device: Path, key: bytes | bytearray, slot: int | None = None) -> bool:
    """Whether ``key`` opens ``device`` (in ``slot`` if given); nothing is mapped."""
    args = [
        "open",
        "--test-passphrase",
        "--key-file",
        "-",
        *(["--key-slot", str(slot)] if slot is not None else []),
    ]
    return _cryptsetup([*args, str(device)], key).returncode == 0


def open_volume(device: Path, name: str, key: bytes | bytearray) -> Path:
    """Map ``device`` as ``/dev/mapper/<name>`` with ``key``; LuksError if the key is refused."""
    proc = _cryptsetup(["open", "--type", "luks2", "--key-file", "-", str(device), name], key)
    if proc.returncode != 0:
        raise _fail(f"open {device}", proc)
    return Path("/dev/mapper") / name


def close_volume(name: str) -> None:
    proc = _cryptsetup(["close", name])
    if proc.returncode != 0:
        raise _fail(f"close /dev/mapper/{name}", proc)
