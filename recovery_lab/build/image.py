"""A scenario's disk image: the stages run in order, the partitions put together.

:func:`build_images` checks every scenario file and every tool first, then runs the stages
(each cached, see :mod:`~recovery_lab.build.cache`) and, per scenario, assembles the raw disk
image (:func:`stage_disk`: GRUB's boot code, the MBR and the three partitions at their
offsets, by :mod:`recovery_lab.disk`) with a ``manifest.json`` beside it: the scenario, the
kernel and tool versions, the sha256 of each partition and of the disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recovery_agent.digest import sha256_file

from .. import disk
from ..checkout import IMAGES
from ..locks import build_lock
from ..pyruntime import build_python_runtime
from ..scenario import Scenario, all_scenarios, find_scenario, load_scenario
from ..tools import package_version, require
from .bootloader import GRUB_DIR, stage_esp, stage_grub
from .cache import Cache, Log, default_cache_dir
from .files import BUSYBOX
from .initramfs import stage_initramfs, stage_recovery
from .kernel import KernelPackages, resolve_kernel, stage_kernel, stage_sensor
from .osroot import stage_os

REQUIRED_TOOLS = (
    "apt-cache",
    "apt-get",
    "dpkg-deb",
    "dpkg-query",
    "depmod",
    "make",
    "gcc-12",
    "strip",
    "cpio",
    "mkfs.ext4",
    "debugfs",
    "mkfs.fat",
    "mcopy",
    "grub-mkimage",
    str(GRUB_DIR / "boot.img"),
    BUSYBOX,
)


@dataclass(frozen=True)
class Artifact:
    """A built disk image for one scenario."""

    scenario: str
    image: Path  # raw disk image (never boot it directly: use a qcow2 overlay)
    manifest: Path  # manifest.json beside the image
    size: int  # bytes (apparent; the file is sparse)
    sha256: str
    kernel_release: str
    expect: dict[str, Any] = field(default_factory=dict)


def stage_disk(
    cache: Cache, scenario: Scenario, kernel: KernelPackages, parts_dirs: dict[str, Path], grub_dir: Path
) -> Path:
    """The raw disk image of ``scenario`` and its manifest.json, from the partition images in
    ``parts_dirs`` (esp, os, recovery) and GRUB's boot code in ``grub_dir``."""

    def build(out: Path) -> None:
        parts = disk.layout(disk.PARTITIONS)
        images = {
            1: parts_dirs["esp"] / "esp.fat",
            2: parts_dirs["os"] / "os.ext4",
            3: parts_dirs["recovery"] / "recovery.ext4",
        }
        image = out / "disk.img"
        disk.assemble(image, parts, images, grub_dir / "boot.img", grub_dir / "core.img")
        manifest = {
            "scenario": scenario.name,
            "scenario_sha256": scenario.source_sha256,
            "scenario_files": {src: sha for src, (_, sha) in sorted(scenario.local_files.items())},
            "expect": scenario.expect.model_dump(),
            "kernel": {"release": kernel.release, "packages": kernel.versions},
            "tools": {
                p: package_version(p)
                for p in ("busybox-static", "grub-pc-bin", "e2fsprogs", "dosfstools", "mtools", "gcc-12")
            },
            "partitions": [
                {
                    "number": p.number,
                    "name": p.name,
                    "type": f"0x{p.type_id:02x}",
                    "start_sector": p.start,
                    "sectors": p.sectors,
                    "sha256": sha256_file(image, p.offset, p.size),
                }
                for p in parts
            ],
            "disk": {"file": image.name, "size": image.stat().st_size, "sha256": sha256_file(image)},
            "stages": {name: d.name for name, d in sorted(parts_dirs.items())} | {"grub": grub_dir.name},
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    inputs = {name: d.name for name, d in parts_dirs.items()} | {
        "grub": grub_dir.name,
        "layout": disk.PARTITIONS,
    }
    return cache.stage("disk", inputs, build, scenario.name)


def build_images(
    scenarios: list[str] | None = None, cache_dir: Path | None = None, log: Log = print
) -> list[Artifact]:
    """Build the images of ``scenarios`` (names or .toml paths; default: every file in
    images/scenarios) and return one :class:`Artifact` each."""
    paths = [find_scenario(s, IMAGES) for s in scenarios] if scenarios else all_scenarios(IMAGES)
    loaded = [load_scenario(p) for p in paths]  # validate all before building anything
    require(*REQUIRED_TOOLS)
    cache = Cache((cache_dir or default_cache_dir()).resolve(), log)
    cache.root.mkdir(parents=True, exist_ok=True)
    kernel = resolve_kernel()
    kernel_dir = stage_kernel(cache, kernel)
    sensor_dir = stage_sensor(cache, kernel_dir, kernel)
    with build_lock(cache.root / "pyruntime.lock", log):  # it builds in place, like a stage
        runtime = build_python_runtime(cache.root, progress=log)
    initramfs_os = stage_initramfs(cache, kernel_dir, kernel, "os")
    initramfs_recovery = stage_initramfs(cache, kernel_dir, kernel, "recovery", runtime)
    recovery_dir = stage_recovery(cache, kernel_dir, kernel, initramfs_recovery, runtime)
    esp_dir = stage_esp(cache)
    grub_dir = stage_grub(cache)
    artifacts = []
    for scenario in loaded:
        os_dir = stage_os(cache, scenario, kernel_dir, kernel, sensor_dir, initramfs_os, runtime)
        disk_dir = stage_disk(
            cache, scenario, kernel, {"esp": esp_dir, "os": os_dir, "recovery": recovery_dir}, grub_dir
        )
        manifest = json.loads((disk_dir / "manifest.json").read_text())
        artifacts.append(
            Artifact(
                scenario=scenario.name,
                image=disk_dir / "disk.img",
                manifest=disk_dir / "manifest.json",
                size=manifest["disk"]["size"],
                sha256=manifest["disk"]["sha256"],
                kernel_release=kernel.release,
                expect=manifest["expect"],
            )
        )
    return artifacts


def build_image(scenario: str, cache_dir: Path | None = None, log: Log = print) -> Artifact:
    """Build (or take from the cache) the disk image of one scenario."""
    return build_images([scenario], cache_dir, log)[0]
