"""The per-run seed disk: the agent's settings and device key for one lab run.

The cached base image holds no secrets. Like cloud-init's NoCloud datasource, each run gets a
small FAT image, attached as the machine's second virtio disk (``/dev/vdb``), that holds
``agent.json`` (the agent settings: device id, ``server_url`` ``http://10.0.2.100:8080``, the
pinned server key, ``device_key: "device.key"``, ``os_root: "/mnt/os"``, ``grubenv:
"/mnt/esp/grub/grubenv"``, the QMR timing settings) and ``device.key`` (PEM). The OS and the
recovery environment look for it (``qmr_seed_mount`` in images/os/lib.sh) and mount it
read-only at ``/seed``; without one they behave as they always did.

The image is made with ``mkfs.fat -C`` and filled with ``mcopy`` (no loop mount, no root),
through :func:`recovery_lab.tools.run`.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from .tools import run

SEED_LABEL = "QMRSEED"
SEED_SIZE_KIB = 2048  # 2 MiB: room for the settings and a key, and a valid FAT12
# Plain 8.3-safe names only: mcopy must not be asked to make long-name entries from odd input.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ENV = {"MTOOLS_SKIP_CHECK": "1"}


def make_seed_disk(out: Path, files: dict[str, bytes]) -> Path:
    """Write a raw FAT image to ``out`` (replaced if it exists) holding ``files`` (name ->
    bytes, top-level names only) and return ``out``. Raises ``ValueError`` for a bad name and
    :class:`recovery_lab.tools.ToolError` if mkfs.fat or mcopy fail."""
    out = Path(out)
    for name in files:
        if not _NAME_RE.match(name):
            raise ValueError(f"seed disk file name {name!r}: use letters, digits, '.', '_', '-' (no folders)")
    total = sum(len(data) for data in files.values())
    if total > (SEED_SIZE_KIB - 256) * 1024:
        raise ValueError(
            f"seed disk files are {total} bytes: more than a {SEED_SIZE_KIB // 1024} MiB seed disk holds"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.unlink()
    run(["mkfs.fat", "-C", "-n", SEED_LABEL, str(out), str(SEED_SIZE_KIB)], env=_ENV)
    with tempfile.TemporaryDirectory(prefix="qmr-seed-") as tmp:
        for name, data in sorted(files.items()):
            src = Path(tmp) / name
            src.write_bytes(data)
            src.chmod(0o600)
            run(["mcopy", "-o", "-i", str(out), str(src), f"::{name}"], env=_ENV)
    return out


def rewrite_seed_disk(path: Path, files: dict[str, bytes]) -> Path:
    """Change the files of the seed disk at ``path`` while a machine has it attached: a new
    image with ``files`` replacing those of the same name is written over the old one's bytes,
    in place (QEMU keeps the file open; a new file would not be seen). Files not named keep
    their content. The guest sees the change from its next boot."""
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="qmr-seed-") as tmp:
        kept = {}
        listing = run(["mdir", "-b", "-i", str(path), "::"], env=_ENV)
        for line in listing.splitlines():
            name = line.strip().removeprefix("::/").removeprefix("::")
            if name and name not in files:
                out = Path(tmp) / name
                run(["mcopy", "-n", "-i", str(path), f"::{name}", str(out)], env=_ENV)
                kept[name] = out.read_bytes()
        new = make_seed_disk(Path(tmp) / "seed.img", {**kept, **files})
        data = new.read_bytes()
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate()
        f.flush()
        os.fsync(f.fileno())
    return path
