"""sha256 of bytes, of an open file and of a file by path: the one file-hash helper.

Files are read in chunks, so a multi-gigabyte file costs one chunk of memory. ``sha256_fd``
hashes through a handle the caller already opened (and checked), which is how the agent
makes sure the file it judged is the file it hashed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_fd(fd: int) -> str:
    """sha256 of everything from the start of the open file ``fd`` (its offset is moved)."""
    os.lseek(fd, 0, os.SEEK_SET)
    digest = hashlib.sha256()
    while chunk := os.read(fd, CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path | str, start: int = 0, length: int | None = None) -> str:
    """sha256 of the file at ``path``, or of ``length`` bytes of it from ``start``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = length
        while left is None or left > 0:
            chunk = f.read(CHUNK if left is None else min(CHUNK, left))
            if not chunk:
                break
            digest.update(chunk)
            if left is not None:
                left -= len(chunk)
    return digest.hexdigest()
