"""The fixed time that makes the lab's trees and images reproducible.

Every file the lab puts into an image (the disk images' filesystems, the initramfs archives,
the recovery environment's Python runtime) gets the same mtime, :data:`EPOCH`, so the same
inputs give the same bytes on any machine and any day.
"""

from __future__ import annotations

import os
from pathlib import Path

# 2024-07-19 04:09 UTC, when channel file 291 went out.
EPOCH = 1721362140


def set_mtimes(root: Path) -> None:
    """Every file, directory and symlink under ``root`` (and ``root``) gets mtime EPOCH."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (EPOCH, EPOCH), follow_symlinks=False)
    os.utime(root, (EPOCH, EPOCH))
