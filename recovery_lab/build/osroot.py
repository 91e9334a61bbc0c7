"""Partition 2: the OS root, the same for every scenario until the scenario changes it.

The OS root holds busybox (with ``images/os/init`` as ``/sbin/init``), the health check, the
kernel and the OS's initramfs, the kernel modules, the sensor driver 1.0 and its copy in the
driver store, the sensor's base channel files, and the agent (for ``recovery-agent health``).
:func:`apply_scenario` then adds, replaces, corrupts or removes the scenario's files and
writes its kernel arguments; :func:`stage_os` makes the ext4 image of the result.

The files a scenario may place by name (``source = "..."``, :data:`CHANNEL_FILES` and
``sensor:<version>``) are made here too; :func:`channel_file` makes a channel file with
``images/sensor/mkchannel.py``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from types import ModuleType

from recovery_agent.layout import CHANNEL_DIR, DRIVER_STORE, DRIVER_SUBDIRS

from ..checkout import IMAGES
from ..disk import partition_mib
from ..pyruntime import RuntimeArtifact
from ..reproducible import EPOCH
from ..scenario import FILE_PREFIX, FileChange, Scenario, ScenarioError
from ..tools import package_version
from .agent import agent_inputs, install_agent
from .cache import Cache, files_hash
from .files import install_busybox, mkfs_ext4, write_file
from .kernel import MODULES_DIR, MODULES_LIST, MODULES_OS, KernelPackages, install_modules

# Fixed filesystem identity of the OS partition (reproducibility; all lab disks alike).
OS_UUID = "51a2c0de-0002-4000-8000-000000000002"
OS_HASH_SEED = "51a2c0de-0002-4000-8000-0000000000a2"

CHANNEL_FILES = {
    # source name -> (template fields, content fields, seed)
    "channel:good-291": (20, 20, 0x291),
    "channel:good-290": (20, 20, 0x290),
    "channel:bad-291": (21, 20, 0x291),
}
# The channel files every OS root has: file name -> source name.
BASE_CHANNELS = {
    "C-00000291-00000000-00000031.sys": "channel:good-291",
    "C-00000290-00000000-00000007.sys": "channel:good-290",
}

OS_RELEASE = """\
PRETTY_NAME="QMR lab OS 1.0"
NAME="QMR lab OS"
ID=qmr-lab
VERSION_ID=1.0
VERSION="1.0"
"""


def _mkchannel() -> ModuleType:
    """images/sensor/mkchannel.py, the channel-file maker the sensor's tests use too."""
    spec = importlib.util.spec_from_file_location("qmr_mkchannel", IMAGES / "sensor" / "mkchannel.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def channel_file(source: str) -> bytes:
    """The bytes of a channel file the lab knows by name (``channel:bad-291``, ...)."""
    template, content, seed = CHANNEL_FILES[source]
    data: bytes = _mkchannel().build(template, content, seed=seed)
    return data


def source_bytes(source: str, sensor_dir: Path | None) -> bytes:
    """The bytes a scenario's ``source = "..."`` names: a channel file or a sensor driver
    (``sensor_dir`` None: the lab built none for this image)."""
    if source in CHANNEL_FILES:
        return channel_file(source)
    if source.startswith("sensor:"):
        if sensor_dir is None:
            raise ScenarioError(f"source {source!r}: the lab built no sensor driver for this image")
        return (sensor_dir / source.removeprefix("sensor:") / "sensor.ko").read_bytes()
    raise ScenarioError(f"unknown source {source!r}")


def change_bytes(scenario: Scenario, change: FileChange, sensor_dir: Path | None) -> bytes:
    """What an ``add`` or ``replace`` writes: the scenario's ``content``, the user's own file
    (``file:``), or an artifact the lab builds."""
    if change.content is not None:
        return change.content.encode()
    source = change.source or ""
    if source.startswith(FILE_PREFIX):
        return scenario.file_source(source)
    return source_bytes(source, sensor_dir)


def _os_root(
    root: Path,
    kernel_dir: Path,
    kernel: KernelPackages,
    sensor_dir: Path,
    initramfs_dir: Path,
    runtime: RuntimeArtifact,
) -> None:
    """The OS root every scenario starts from (see the module docstring)."""
    for d in (
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "mnt/esp",
        "mnt/os",
        "seed",
        "root",
        "boot/efi",
        CHANNEL_DIR,
        "etc/init.d",
    ):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    install_busybox(root, skip={"sbin/init"})
    install_agent(root, runtime)
    write_file(root / "sbin" / "init", (IMAGES / "os" / "init").read_bytes(), 0o755)
    write_file(root / "sbin" / "health-check", (IMAGES / "os" / "health-check").read_bytes(), 0o755)
    write_file(root / "lib" / "qmr.sh", (IMAGES / "os" / "lib.sh").read_bytes())
    write_file(root / "etc" / "init.d" / "S10-early", (IMAGES / "os" / "S10-early").read_bytes(), 0o755)
    write_file(root / "etc" / "early.conf", "# early boot settings: name=value\nconsole=ttyS0\n")
    write_file(
        root / "etc" / "sensor" / "sensor.conf", "# sensor driver module options, one a line (e.g. hang=1)\n"
    )
    write_file(root / "etc" / "os-release", OS_RELEASE)
    write_file(root / "etc" / "hostname", "qmr-lab\n")
    write_file(
        root / "boot" / "vmlinuz", (kernel_dir / "root/boot" / f"vmlinuz-{kernel.release}").read_bytes()
    )
    write_file(root / "boot" / "initrd.img", (initramfs_dir / "initrd.img").read_bytes())
    moddir = root / MODULES_DIR / kernel.release
    order = install_modules(kernel_dir / "root", kernel.release, MODULES_OS, moddir)
    write_file(moddir / MODULES_LIST, "\n".join(order) + "\n")
    write_file(moddir / DRIVER_SUBDIRS[0] / "sensor.ko", (sensor_dir / "1.0" / "sensor.ko").read_bytes())
    write_file(root / DRIVER_STORE / "sensor/1.0/sensor.ko", (sensor_dir / "1.0" / "sensor.ko").read_bytes())
    for name, source in BASE_CHANNELS.items():
        write_file(root / CHANNEL_DIR / name, source_bytes(source, sensor_dir))


def apply_scenario(root: Path, scenario: Scenario, sensor_dir: Path, kernel_release: str) -> None:
    """Apply the scenario's file changes and kernel arguments to an OS root directory.
    ``{kernel_release}`` in a path stands for the image's kernel release (``uname -r``)."""
    where = scenario.source_path or scenario.name
    for i, change in enumerate(scenario.files):
        target = root / change.path.replace("{kernel_release}", kernel_release)
        exists = target.exists() or target.is_symlink()
        field_name = f"files[{i}]"
        if change.action == "add" and exists:
            raise ScenarioError(
                f"{where}: field {field_name}: {change.path} already exists in "
                f'the image: use action = "replace"'
            )
        if change.action in ("replace", "corrupt", "remove") and not exists:
            raise ScenarioError(
                f"{where}: field {field_name}: {change.path} is not in the "
                f'image: use action = "add", or fix the path'
            )
        if change.action in ("add", "replace"):
            write_file(target, change_bytes(scenario, change, sensor_dir), change.file_mode)
        elif change.action == "corrupt":
            # Deterministic damage: invert the first 64 bytes (the header of most formats).
            damaged = bytearray(target.read_bytes())
            for j in range(min(64, len(damaged))):
                damaged[j] ^= 0xFF
            write_file(target, bytes(damaged), target.stat().st_mode & 0o7777)
        else:
            target.unlink()
    args = " ".join(scenario.kernel_args)
    write_file(
        root / "boot" / "cmdline.cfg",
        f'# kernel arguments of scenario {scenario.name} (sourced by grub.cfg)\nset qmr_os_args="{args}"\n',
    )


def stage_os(
    cache: Cache,
    scenario: Scenario,
    kernel_dir: Path,
    kernel: KernelPackages,
    sensor_dir: Path,
    initramfs_dir: Path,
    runtime: RuntimeArtifact,
) -> Path:
    """Partition 2's ext4 image for ``scenario``."""
    recipe = [IMAGES / "os" / n for n in ("init", "health-check", "lib.sh", "S10-early")]
    recipe.append(IMAGES / "sensor" / "mkchannel.py")

    def build(out: Path) -> None:
        root = out / "root"
        _os_root(root, kernel_dir, kernel, sensor_dir, initramfs_dir, runtime)
        apply_scenario(root, scenario, sensor_dir, kernel.release)
        mkfs_ext4(root, out / "os.ext4", partition_mib("os"), OS_UUID, OS_HASH_SEED, "qmr-os")
        shutil.rmtree(root)

    inputs = {
        "kernel": kernel.versions,
        "sensor": sensor_dir.name,
        "initramfs": initramfs_dir.name,
        "files": files_hash(recipe),
        "scenario": scenario.build_sha256,
        "scenario_name": scenario.name,
        "busybox": package_version("busybox-static"),
        "e2fsprogs": package_version("e2fsprogs"),
        "epoch": EPOCH,
        "size": partition_mib("os"),
        **agent_inputs(runtime),
    }
    return cache.stage("os", inputs, build, scenario.name)
