"""The two initramfs images and the recovery partition.

- the OS's initramfs (``images/os/initramfs-init``): busybox, the virtio and ext4 modules; it
  mounts partition 2 and ``switch_root``s into the OS;
- the recovery environment's (``images/recovery/init``): busybox, the modules for disks,
  pstore, pvpanic and the network, the agent's launcher and udhcpc's script, and symlinks
  into :data:`RUNTIME_MOUNT` for the Python runtime;
- partition 3 (ext4): the kernel, the recovery initramfs, which GRUB's recovery entry boots,
  and the Python runtime with the agent under ``runtime/``, which the recovery init mounts
  read-only at :data:`RUNTIME_MOUNT` before it runs the agent.

Why the runtime is not in the initramfs: GRUB reads the kernel and the initramfs through the
BIOS and the kernel unpacks the initramfs, both slow under TCG; from the partition, Python
reads only the files it imports. Measured (the recovery boot from GRUB's choice to
``Run /init``, three pairs booted in turn, docs/scale.md): 19.3 s on average with the 21 MB
initramfs, 16.2 s with this one (1.9 MB): 1.9 s less unpacking, 1.2 s less reading.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..checkout import IMAGES
from ..disk import partition_mib
from ..pyruntime import RuntimeArtifact
from ..reproducible import EPOCH
from ..tools import package_version
from .agent import AGENT_FILES, agent_inputs, install_agent
from .cache import BuildError, Cache, files_hash
from .files import install_busybox, mkfs_ext4, newc_initramfs, write_file
from .kernel import (
    MODULES_DIR,
    MODULES_LIST,
    MODULES_RECOVERY,
    MODULES_ROOT_DISK,
    KernelPackages,
    install_modules,
)

# Fixed filesystem identity of the recovery partition (reproducibility; all lab disks alike).
RECOVERY_UUID = "51a2c0de-0003-4000-8000-000000000003"
RECOVERY_HASH_SEED = "51a2c0de-0003-4000-8000-0000000000a3"
# Where the recovery init mounts partition 3, and the runtime's folder on it.
RUNTIME_MOUNT = "/recovery"
RUNTIME_DIR = "runtime"


def _link_runtime(root: Path, runtime_root: Path, target: str) -> None:
    """In ``root``, a symlink to ``target``/<path> for each path of the runtime tree that
    ``root`` lacks (the highest such: ``usr/lib/python3.11``, ``lib64``, ...), so that the
    runtime's absolute paths (the ELF interpreter, the stdlib) resolve once it is mounted."""
    linked: list[Path] = []
    for path in sorted(runtime_root.rglob("*")):
        rel = path.relative_to(runtime_root)
        if any(rel.is_relative_to(done) for done in linked):
            continue  # under a link made already
        dest = root / rel
        if dest.is_symlink() or dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        linked.append(rel)
        dest.symlink_to(f"{target}/{rel}")


def _initramfs_root(
    root: Path,
    kernel_dir: Path,
    kernel: KernelPackages,
    modules: list[str],
    init: Path,
    runtime: RuntimeArtifact | None = None,
) -> None:
    """An initramfs root: busybox, ``init``, the shell library, ``modules`` in load order,
    and with ``runtime`` the agent."""
    for d in ("proc", "sys", "dev", "tmp", "run", "newroot"):
        (root / d).mkdir(parents=True, exist_ok=True)
    install_busybox(root)
    if runtime is not None:
        for d in ("etc", "root", "seed", "mnt/esp", "mnt/os", RUNTIME_MOUNT.strip("/")):
            (root / d).mkdir(parents=True, exist_ok=True)
        for rel, (recipe, mode) in AGENT_FILES.items():
            write_file(root / rel, recipe.read_bytes(), mode)
    write_file(root / "init", init.read_bytes(), 0o755)
    write_file(root / "lib" / "qmr.sh", (IMAGES / "os" / "lib.sh").read_bytes())
    order = install_modules(kernel_dir / "root", kernel.release, modules, root / MODULES_DIR / kernel.release)
    write_file(root / MODULES_DIR / MODULES_LIST, "\n".join(order) + "\n")
    if runtime is not None:
        _link_runtime(root, Path(runtime.root), f"{RUNTIME_MOUNT}/{RUNTIME_DIR}")


def stage_initramfs(
    cache: Cache,
    kernel_dir: Path,
    kernel: KernelPackages,
    flavour: str,
    runtime: RuntimeArtifact | None = None,
) -> Path:
    """``flavour`` "os" (mounts p2 and switch_roots) or "recovery" (is the whole recovery
    environment: needs ``runtime``, the Python runtime the agent runs on)."""
    init = IMAGES / ("os/initramfs-init" if flavour == "os" else "recovery/init")
    modules = MODULES_ROOT_DISK if flavour == "os" else MODULES_RECOVERY
    if flavour == "recovery" and runtime is None:
        raise BuildError("the recovery initramfs needs the Python runtime")
    runtime = runtime if flavour == "recovery" else None

    def build(out: Path) -> None:
        root = out / "root"
        _initramfs_root(root, kernel_dir, kernel, modules, init, runtime)
        newc_initramfs(root, out / "initrd.img")
        shutil.rmtree(root)

    inputs = {
        "kernel": kernel.versions,
        "flavour": flavour,
        "modules": modules,
        "files": files_hash([init, IMAGES / "os" / "lib.sh"]),
        "busybox": package_version("busybox-static"),
        "epoch": EPOCH,
    }
    if runtime is not None:
        inputs |= agent_inputs(runtime)
    return cache.stage(f"initramfs-{flavour}", inputs, build, kernel.release)


def stage_recovery(
    cache: Cache, kernel_dir: Path, kernel: KernelPackages, initramfs_dir: Path, runtime: RuntimeArtifact
) -> Path:
    """Partition 3's ext4 image: ``boot/vmlinuz``, the recovery initramfs, and the Python
    runtime with the agent under ``runtime/``."""

    def build(out: Path) -> None:
        root = out / "root"
        write_file(
            root / "boot" / "vmlinuz", (kernel_dir / "root/boot" / f"vmlinuz-{kernel.release}").read_bytes()
        )
        write_file(root / "boot" / "initrd.img", (initramfs_dir / "initrd.img").read_bytes())
        install_agent(root / RUNTIME_DIR, runtime)
        mkfs_ext4(
            root,
            out / "recovery.ext4",
            partition_mib("recovery"),
            RECOVERY_UUID,
            RECOVERY_HASH_SEED,
            "qmr-recovery",
        )
        shutil.rmtree(root)

    inputs = {
        "kernel": kernel.versions,
        "initramfs": initramfs_dir.name,
        "epoch": EPOCH,
        "e2fsprogs": package_version("e2fsprogs"),
        "size": partition_mib("recovery"),
    } | agent_inputs(runtime)
    return cache.stage("recovery", inputs, build, kernel.release)
