"""Unpacking a wheel into ``site-packages``, standard library only.

The install (:mod:`~.runtime`) and the lab's recovery-environment runtime
(``recovery_lab.pyruntime``) both put wheels in place without pip: a wheel is a zip whose
files go to ``site-packages``, its ``.data/purelib`` and ``.data/platlib`` too; its scripts,
headers and data are not needed. A member whose path is absolute or climbs out (``..``) is
refused, never written.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path


class UnsafeWheel(ValueError):
    """A wheel member whose path would land outside ``site-packages``."""


Skip = Callable[[str, str], bool]  # (member name in the zip, file name) -> leave it out


def unpack_wheel(wheel: Path, site: Path, skip: Skip | None = None) -> int:
    """Write ``wheel``'s site-packages files under ``site`` (mode 0755 where the wheel marks
    them executable, else 0644) except those ``skip`` names; return how many were written.
    Every member's path is checked before the first is written."""
    with zipfile.ZipFile(wheel) as zf:
        members: list[tuple[zipfile.ZipInfo, list[str]]] = []
        for info in zf.infolist():
            parts = info.filename.split("/")
            if parts[0].endswith(".data"):
                if len(parts) > 2 and parts[1] in ("purelib", "platlib"):
                    parts = parts[2:]
                else:
                    continue
            if info.is_dir() or not parts[-1]:
                continue
            if any(p in ("", ".", "..") for p in parts) or info.filename.startswith("/"):
                raise UnsafeWheel(f"{wheel.name}: unsafe path {info.filename!r} in the wheel")
            if skip is None or not skip(info.filename, parts[-1]):
                members.append((info, parts))
        for info, parts in members:
            dest = site.joinpath(*parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(zf.read(info))
            dest.chmod(0o755 if (info.external_attr >> 16) & 0o100 else 0o644)
    return len(members)
