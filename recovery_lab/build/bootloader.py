"""GRUB: its boot code and partition 1, the ESP with ``grub.cfg`` and ``grubenv``.

GRUB does the boot counting (``images/grub/grub.cfg``; the mechanism: docs/boot-counting.md):
it reads ``boot_count`` and ``boot_limit`` from ``grubenv`` (1024 bytes, written by
:class:`recovery_agent.bootenv.BootEnv`) and boots the recovery entry once the count reached
the limit. The machine boots in BIOS mode: ``boot.img`` in the MBR, ``core.img`` right after it
(i386-pc, with the modules in :data:`GRUB_MODULES` and its prefix on the ESP).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from recovery_agent.bootenv import BootEnv
from recovery_agent.digest import sha256_bytes, sha256_file

from ..checkout import IMAGES
from ..disk import partition_mib
from ..reproducible import EPOCH, set_mtimes
from ..tools import package_version, run
from .cache import Cache

GRUB_MODULES = [
    "biosdisk",
    "part_msdos",
    "fat",
    "ext2",
    "normal",
    "linux",
    "loadenv",
    "test",
    "echo",
    "configfile",
    "serial",
    "terminal",
    "boot",
    "reboot",
    "halt",
]
GRUB_PREFIX = "(hd0,msdos1)/grub"
GRUB_DIR = Path("/usr/lib/grub/i386-pc")

BOOT_LIMIT = 2

# Fixed FAT volume id of the ESP (reproducibility; all lab disks alike).
ESP_VOLUME_ID = "51a2c0de"


def initial_bootenv() -> BootEnv:
    """A new machine's grubenv: no failed boots yet, the recovery entry after BOOT_LIMIT."""
    return BootEnv.new({"boot_count": 0, "boot_limit": BOOT_LIMIT})


def stage_esp(cache: Cache) -> Path:
    """Partition 1's FAT image: ``grub/grub.cfg`` and a new ``grub/grubenv``."""
    grub_cfg = IMAGES / "grub" / "grub.cfg"

    def build(out: Path) -> None:
        files = out / "files"
        (files / "grub").mkdir(parents=True)
        shutil.copy(grub_cfg, files / "grub" / "grub.cfg")
        initial_bootenv().create(files / "grub" / "grubenv")
        set_mtimes(files)
        image = out / "esp.fat"
        env = {"SOURCE_DATE_EPOCH": str(EPOCH), "MTOOLS_SKIP_CHECK": "1"}
        # No volume label (-n): mkfs.fat stamps the label's directory entry with the current
        # time. mmd would too; mcopy -s -m copies the directory with its fixed mtime.
        run(
            ["mkfs.fat", "-C", "-F", "16", "-i", ESP_VOLUME_ID, image, str(partition_mib("esp") * 1024)],
            env=env,
        )
        run(["mcopy", "-s", "-m", "-i", image, files / "grub", "::"], env=env)
        shutil.rmtree(files)

    inputs = {
        "grub.cfg": sha256_file(grub_cfg),
        "grubenv": sha256_bytes(initial_bootenv().to_bytes()),
        "dosfstools": package_version("dosfstools"),
        "mtools": package_version("mtools"),
        "epoch": EPOCH,
        "size": partition_mib("esp"),
    }
    return cache.stage("esp", inputs, build)


def stage_grub(cache: Cache) -> Path:
    """GRUB's ``boot.img`` (for the MBR) and ``core.img`` (for the sectors after it)."""

    def build(out: Path) -> None:
        shutil.copy(GRUB_DIR / "boot.img", out / "boot.img")
        run(["grub-mkimage", "-O", "i386-pc", "-o", out / "core.img", "-p", GRUB_PREFIX, *GRUB_MODULES])

    inputs = {"grub-pc-bin": package_version("grub-pc-bin"), "modules": GRUB_MODULES, "prefix": GRUB_PREFIX}
    return cache.stage("grub", inputs, build)
