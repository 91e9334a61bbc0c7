"""``recovery-lab build``: the lab machine's disk images, reproducible and cached.

An image is made in stages; each stage's output is a directory in the cache named by a sha256
over everything that goes into it (package versions, recipe files, the scenario file, the
stage's own code), so a second build with the same inputs reuses it and says "cached"::

    kernel       apt-get download of Debian's kernel image, headers and kbuild packages,
                 unpacked into one root (headers Makefile fixed, depmod run)
    sensor       images/sensor/sensor.c built against those headers: 1.0 (good) and 2.0 (bad)
    pyruntime    Debian's python3.11 + the agent's wheels + recovery_agent, one tree
                 (recovery_lab.pyruntime; its own cache directory, keyed the same way)
    initramfs    the OS's initramfs (busybox, virtio and ext4 modules; mounts p2, switch_root)
                 and the recovery environment's (busybox, modules, the Python runtime and the
                 agent: the whole recovery environment)
    recovery     partition 3: kernel + the recovery initramfs
    esp          partition 1 (FAT): grub/grub.cfg and grub/grubenv
    grub         GRUB's boot.img and core.img (i386-pc, BIOS)
    os           partition 2 (ext4) for one scenario: the OS root (with the same Python
                 runtime and agent, for `recovery-agent health`) plus the scenario's changes
    disk         the raw disk image for one scenario, with a manifest.json beside it

Only ``os`` and ``disk`` differ between scenarios. Every file is written with a fixed mtime
and every filesystem with a fixed UUID and hash seed, so the same inputs give the same bytes.

Public API: :func:`build_image` (one scenario -> :class:`Artifact`), :func:`build_images`,
:func:`default_cache_dir`.
"""

from __future__ import annotations

import gzip
import importlib.util
import inspect
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from recovery_agent.bootenv import BootEnv
from recovery_agent.digest import sha256_bytes, sha256_file
from recovery_agent.layout import CHANNEL_DIR, DRIVER_STORE, DRIVER_SUBDIRS, MODULES_DIRS

from . import disk
from .pyruntime import RuntimeArtifact, build_python_runtime
from .scenario import Scenario, ScenarioError, all_scenarios, find_scenario, load_scenario
from .tools import FILES, ToolError, package_version, require, run

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "images"

# Every file in every filesystem gets this mtime (2024-07-19 04:09 UTC, when channel file 291
# went out), so that images are byte-for-byte reproducible.
EPOCH = 1721362140

# Fixed filesystem identities (reproducibility; the lab's disks are all alike).
ESP_VOLUME_ID = "51a2c0de"
OS_UUID = "51a2c0de-0002-4000-8000-000000000002"
OS_HASH_SEED = "51a2c0de-0002-4000-8000-0000000000a2"
RECOVERY_UUID = "51a2c0de-0003-4000-8000-000000000003"
RECOVERY_HASH_SEED = "51a2c0de-0003-4000-8000-0000000000a3"

# Partition sizes in MiB: (name, MBR type, size).
PARTITIONS = [
    ("esp", disk.TYPE_FAT16_LBA, 32),
    ("os", disk.TYPE_LINUX, 192),
    ("recovery", disk.TYPE_LINUX, 192),
]

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

# Debian's kernel package and the lab's roots keep modules in lib/modules/<release>; the
# images' init scripts load the modules listed in qmr-modules.list there, in order.
MODULES_DIR = MODULES_DIRS[0]
MODULES_LIST = "qmr-modules.list"

# Kernel modules by name, in load order; each is preceded by its dependencies (modules.dep).
# ext4 asks the crypto API for crc32c at mount time (no modules.dep entry), hence
# crc32c_generic before it.
MODULES_ROOT_DISK = ["virtio_pci", "virtio_blk", "crc32c_generic", "ext4"]
MODULES_NET = ["failover", "net_failover", "virtio_net"]
MODULES_OS = MODULES_ROOT_DISK + [
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "reed_solomon",
    "ramoops",
    "pvpanic-mmio",
    "pvpanic-pci",
    "i6300esb",
    *MODULES_NET,
]
MODULES_RECOVERY = MODULES_ROOT_DISK + [
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "reed_solomon",
    "ramoops",
    "pvpanic-mmio",
    "pvpanic-pci",
    *MODULES_NET,
]

# What the OS and the recovery environment need to run the agent, besides the runtime tree:
# the launcher (/usr/bin/recovery-agent) and udhcpc's event script.
AGENT_FILES = {
    "usr/bin/recovery-agent": (IMAGES / "recovery" / "recovery-agent", 0o755),
    "usr/share/udhcpc/default.script": (IMAGES / "os" / "udhcpc.script", 0o755),
}

KERNEL_META = "linux-image-amd64"
KBUILD = "linux-kbuild-6.1"

CHANNEL_FILES = {
    # source name -> (template fields, content fields, seed)
    "channel:good-291": (20, 20, 0x291),
    "channel:good-290": (20, 20, 0x290),
    "channel:bad-291": (21, 20, 0x291),
}
BASE_CHANNELS = {
    "C-00000291-00000000-00000031.sys": "channel:good-291",
    "C-00000290-00000000-00000007.sys": "channel:good-290",
}

SENSOR_VARIANTS = {
    "1.0": "",
    "2.0": '-DSENSOR_VERSION=\\"2.0\\" -DSENSOR_BAD_DRIVER',
}


class BuildError(Exception):
    """Raised when an image cannot be built; the message names the stage and the cause."""


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$QMR_CACHE``, else ``.cache/qmr`` in the repository checkout (git-ignored)."""
    env = os.environ.get("QMR_CACHE")
    return Path(env) if env else REPO / ".cache" / "qmr"


def cache_key(inputs: dict) -> str:
    """The sha256 of a stage's inputs (a JSON-able dict), order independent."""
    return sha256_bytes(json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode())


Log = Callable[[str], None]


@dataclass
class Cache:
    """Stage outputs under ``root``, one directory per (stage, inputs)."""

    root: Path
    log: Log = print

    def stage(self, name: str, inputs: dict, build: Callable[[Path], None], label: str = "") -> Path:
        """The output directory of stage ``name`` for ``inputs``; ``build(tmpdir)`` fills it
        if it is not in the cache yet. The stage's code (``build``'s source) is an input too,
        so editing a stage rebuilds it."""
        inputs = {**inputs, "stage": name, "code": _code_hash(build)}
        key = cache_key(inputs)
        out = self.root / f"{name}-{key[:16]}"
        what = f"[{name}{' ' + label if label else ''}]"
        if (out / "inputs.json").exists():
            self.log(f"{what} cached ({out.name})")
            return out
        tmp = self.root / f"{name}-{key[:16]}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        started = time.monotonic()
        self.log(f"{what} building ...")
        try:
            build(tmp)
        except (ToolError, OSError, ValueError) as exc:
            raise BuildError(f"stage {name}: {exc}") from exc
        (tmp / "inputs.json").write_text(json.dumps(inputs, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        self.log(f"{what} built in {time.monotonic() - started:.1f}s ({out.name})")
        return out


def _code_hash(fn: Callable) -> str:
    try:
        return sha256_bytes(inspect.getsource(fn).encode())
    except (OSError, TypeError):
        return "unknown"


def _files_hash(paths: Iterable[Path]) -> dict[str, str]:
    return {str(p.relative_to(REPO)): sha256_file(p) for p in sorted(paths)}


# --------------------------------------------------------------------------- helpers


def _set_mtimes(root: Path) -> None:
    """Every file, directory and symlink under ``root`` (and root) gets mtime EPOCH."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (EPOCH, EPOCH), follow_symlinks=False)
    os.utime(root, (EPOCH, EPOCH))


def _write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)


def _mkchannel() -> ModuleType:
    spec = importlib.util.spec_from_file_location("qmr_mkchannel", IMAGES / "sensor" / "mkchannel.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _busybox_applets(busybox: Path) -> list[str]:
    """Applet paths (``bin/ls``, ``sbin/ifconfig``, ...) from ``busybox --list-full``."""
    return sorted(set(run([busybox, "--list-full"]).split()))


def _install_busybox(root: Path, skip: Iterable[str] = ()) -> None:
    busybox = Path(FILES_BUSYBOX)
    _write(root / "bin" / "busybox", busybox.read_bytes(), 0o755)
    skip = set(skip)
    for applet in _busybox_applets(busybox):
        if applet in skip or applet == "bin/busybox":
            continue
        link = root / applet
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists() and not link.is_symlink():
            link.symlink_to("/bin/busybox")


FILES_BUSYBOX = next(path for path, pkg in FILES.items() if pkg == "busybox-static")


def _install_agent(root: Path, runtime: RuntimeArtifact) -> None:
    """Merge the Python runtime tree (``usr/bin/python3.11``, ``usr/lib/python3.11``,
    ``lib/x86_64-linux-gnu``, ``lib64/ld-linux-x86-64.so.2``) into ``root``, with the
    ``recovery-agent`` launcher and udhcpc's script (:data:`AGENT_FILES`)."""
    src = Path(runtime.root)
    for path in sorted(src.rglob("*")):
        dest = root / path.relative_to(src)
        if path.is_symlink():
            if dest.is_symlink() or dest.exists():
                dest.unlink()
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(os.readlink(path))
        elif path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
        else:
            _write(dest, path.read_bytes(), path.stat().st_mode & 0o7777)
    for rel, (recipe, mode) in AGENT_FILES.items():
        _write(root / rel, recipe.read_bytes(), mode)


def _agent_inputs(runtime: RuntimeArtifact) -> dict:
    """Cache-key inputs for a stage that holds the agent: the runtime's key (which covers
    its packages, wheels and the agent's sources) and the launcher and udhcpc script."""
    return {
        "pyruntime": runtime.key,
        "agent_files": _files_hash(recipe for recipe, _ in AGENT_FILES.values()),
    }


def _newc_initramfs(root: Path, out: Path) -> None:
    """``root`` as a gzip'd newc cpio, entries sorted, owner 0:0, fixed mtimes, no gzip
    timestamp."""
    _set_mtimes(root)
    names = ["."] + sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    raw = out.with_suffix(".cpio")
    run(
        ["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0", "--reproducible"],
        cwd=root,
        input=("\n".join(names) + "\n").encode(),
        stdout_to=raw,
    )
    with open(raw, "rb") as f, open(out, "wb") as g:
        with gzip.GzipFile(filename="", mode="wb", fileobj=g, compresslevel=9, mtime=0) as z:
            shutil.copyfileobj(f, z)
    raw.unlink()


def _mkfs_ext4(root: Path, out: Path, size_mib: int, uuid: str, hash_seed: str, label: str) -> None:
    """An ext4 image of directory ``root``, reproducible: fixed UUID, hash seed, timestamps.

    ``mkfs.ext4 -d`` copies each inode's ctime from the host file, which cannot be set, so
    debugfs rewrites every ctime afterwards (E2FSPROGS_FAKE_TIME fixes the rest)."""
    _set_mtimes(root)
    if out.exists():
        out.unlink()
    with open(out, "wb") as f:
        f.truncate(size_mib * disk.MIB)
    env = {"E2FSPROGS_FAKE_TIME": str(EPOCH), "SOURCE_DATE_EPOCH": str(EPOCH)}
    run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            label,
            "-U",
            uuid,
            "-E",
            f"hash_seed={hash_seed},root_owner=0:0,lazy_itable_init=0,nodiscard",
            "-d",
            root,
            out,
        ],
        env=env,
    )
    # atime too: reading a directory while copying it updates its atime (relatime).
    cmds = []
    for path in ["/", "/lost+found"] + [f"/{p.relative_to(root)}" for p in sorted(root.rglob("*"))]:
        cmds += [f"sif {path} ctime @{EPOCH}", f"sif {path} atime @{EPOCH}"]
    script = out.with_suffix(".debugfs")
    script.write_text("\n".join(cmds) + "\n")
    run(["debugfs", "-w", "-f", script, out], env=env)
    script.unlink()


# --------------------------------------------------------------------------- kernel


@dataclass(frozen=True)
class KernelPackages:
    """The exact Debian packages an image's kernel comes from."""

    release: str  # uname -r, e.g. 6.1.0-56-amd64
    versions: dict[str, str]  # package -> version

    @property
    def abi(self) -> str:
        return self.release.removesuffix("-amd64")


def resolve_kernel() -> KernelPackages:
    """The kernel linux-image-amd64 depends on now, and the candidate version of each
    package the build downloads (``apt-cache``; run ``apt-get update`` first)."""
    depends = run(["apt-cache", "depends", KERNEL_META])
    m = re.search(r"Depends: linux-image-(\S+)", depends)
    if not m:
        raise BuildError(f"apt-cache depends {KERNEL_META} names no kernel: run apt-get update")
    release = m.group(1)
    abi = release.removesuffix("-amd64")
    names = [f"linux-image-{release}", f"linux-headers-{release}", f"linux-headers-{abi}-common", KBUILD]
    versions = {}
    for name in names:
        policy = run(["apt-cache", "policy", name])
        vm = re.search(r"Candidate:\s*(\S+)", policy)
        if not vm or vm.group(1) == "(none)":
            raise BuildError(f"apt knows no version of {name}: run apt-get update")
        versions[name] = vm.group(1)
    return KernelPackages(release, versions)


def stage_kernel(cache: Cache, kernel: KernelPackages) -> Path:
    def build(out: Path) -> None:
        debs = out / "debs"
        debs.mkdir()
        run(["apt-get", "download", "-q", *[f"{n}={v}" for n, v in kernel.versions.items()]], cwd=debs)
        root = out / "root"
        for deb in sorted(debs.glob("*.deb")):
            package = run(["dpkg-deb", "-f", deb, "Package"]).strip()
            version = run(["dpkg-deb", "-f", deb, "Version"]).strip()
            if kernel.versions.get(package) != version:
                raise BuildError(
                    f"downloaded {deb.name} is {package} {version}, expected {kernel.versions.get(package)}"
                )
            run(["dpkg-deb", "-x", deb, root])
        # NOTES.md pitfall 1: the flavour headers' Makefile includes the common headers by
        # absolute path; point it at the unpacked copy.
        makefile = root / "usr/src" / f"linux-headers-{kernel.release}" / "Makefile"
        text = makefile.read_text()
        fixed = re.sub(
            r"^include /usr/src/(linux-headers-[^/]*-common)/Makefile",
            r"include $(CURDIR)/../\1/Makefile",
            text,
            flags=re.M,
        )
        if fixed == text:
            raise BuildError(
                f"{makefile.name} of linux-headers-{kernel.release} has no "
                f"absolute include to fix: check NOTES.md pitfall 1"
            )
        makefile.write_text(fixed)
        run(["depmod", "-b", root, kernel.release])
        (out / "kernel.json").write_text(
            json.dumps({"release": kernel.release, "packages": kernel.versions}, indent=2) + "\n"
        )

    return cache.stage("kernel", {"packages": kernel.versions}, build, kernel.release)


def module_closure(kernel_root: Path, release: str, names: Iterable[str]) -> list[str]:
    """Paths (relative to ``lib/modules/<release>``) of ``names`` and their dependencies,
    each dependency before its users, from modules.dep."""
    moddir = kernel_root / MODULES_DIR / release
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[Path(path).name.removesuffix(".ko").replace("-", "_")] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in reversed(deps.get(path, [])):
            visit(dep)
        order.append(path)

    for name in names:
        key = name.replace("-", "_")
        if key not in by_name:
            raise BuildError(f"kernel {release} has no module {name} (not in modules.dep)")
        visit(by_name[key])
    return order


def _install_modules(kernel_root: Path, release: str, names: list[str], dest: Path) -> list[str]:
    order = module_closure(kernel_root, release, names)
    src = kernel_root / MODULES_DIR / release
    for rel in order:
        _write(dest / rel, (src / rel).read_bytes())
    return order


# --------------------------------------------------------------------------- sensor


def stage_sensor(cache: Cache, kernel_dir: Path, kernel: KernelPackages) -> Path:
    sources = [IMAGES / "sensor" / "sensor.c", IMAGES / "sensor" / "Makefile"]

    def build(out: Path) -> None:
        headers = kernel_dir / "root/usr/src" / f"linux-headers-{kernel.release}"
        for version, flags in SENSOR_VARIANTS.items():
            work = out / "build" / version
            work.mkdir(parents=True)
            for src in sources:
                shutil.copy(src, work / src.name)
            # Map build paths away so the module's bytes do not depend on the cache location.
            kcflags = f"{flags} -ffile-prefix-map={work}=sensor -ffile-prefix-map={kernel_dir / 'root'}="
            run(["make", "-C", work, f"KDIR={headers}", f"KCFLAGS={kcflags.strip()}"])
            ko = out / version / "sensor.ko"
            ko.parent.mkdir()
            shutil.copy(work / "sensor.ko", ko)
            # Debug info names build paths; the lab does not need it (like INSTALL_MOD_STRIP).
            run(["strip", "--strip-debug", ko])
        shutil.rmtree(out / "build")

    inputs = {
        "kernel": kernel.versions,
        "sources": _files_hash(sources),
        "variants": SENSOR_VARIANTS,
        "gcc": package_version("gcc-12"),
    }
    return cache.stage("sensor", inputs, build, kernel.release)


# --------------------------------------------------------------------------- initramfs


def _initramfs_root(
    root: Path,
    kernel_dir: Path,
    kernel: KernelPackages,
    modules: list[str],
    init: Path,
    runtime: RuntimeArtifact | None = None,
) -> None:
    for d in ("proc", "sys", "dev", "tmp", "run", "newroot"):
        (root / d).mkdir(parents=True, exist_ok=True)
    _install_busybox(root)
    if runtime is not None:
        for d in ("etc", "root", "seed", "mnt/esp", "mnt/os"):
            (root / d).mkdir(parents=True, exist_ok=True)
        _install_agent(root, runtime)
    _write(root / "init", init.read_bytes(), 0o755)
    _write(root / "lib" / "qmr.sh", (IMAGES / "os" / "lib.sh").read_bytes())
    order = _install_modules(
        kernel_dir / "root", kernel.release, modules, root / MODULES_DIR / kernel.release
    )
    _write(root / MODULES_DIR / MODULES_LIST, "\n".join(order) + "\n")


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
        _newc_initramfs(root, out / "initrd.img")
        shutil.rmtree(root)

    inputs = {
        "kernel": kernel.versions,
        "flavour": flavour,
        "modules": modules,
        "files": _files_hash([init, IMAGES / "os" / "lib.sh"]),
        "busybox": package_version("busybox-static"),
        "epoch": EPOCH,
    }
    if runtime is not None:
        inputs |= _agent_inputs(runtime)
    return cache.stage(f"initramfs-{flavour}", inputs, build, kernel.release)


def stage_recovery(cache: Cache, kernel_dir: Path, kernel: KernelPackages, initramfs_dir: Path) -> Path:
    def build(out: Path) -> None:
        root = out / "root"
        _write(
            root / "boot" / "vmlinuz", (kernel_dir / "root/boot" / f"vmlinuz-{kernel.release}").read_bytes()
        )
        _write(root / "boot" / "initrd.img", (initramfs_dir / "initrd.img").read_bytes())
        _mkfs_ext4(
            root, out / "recovery.ext4", PARTITIONS[2][2], RECOVERY_UUID, RECOVERY_HASH_SEED, "qmr-recovery"
        )
        shutil.rmtree(root)

    inputs = {
        "kernel": kernel.versions,
        "initramfs": initramfs_dir.name,
        "epoch": EPOCH,
        "e2fsprogs": package_version("e2fsprogs"),
        "size": PARTITIONS[2][2],
    }
    return cache.stage("recovery", inputs, build, kernel.release)


# --------------------------------------------------------------------------- ESP and GRUB


def grubenv_initial() -> bytes:
    return BootEnv.new({"boot_count": 0, "boot_limit": BOOT_LIMIT}).to_bytes()


def stage_esp(cache: Cache) -> Path:
    grub_cfg = IMAGES / "grub" / "grub.cfg"

    def build(out: Path) -> None:
        files = out / "files"
        (files / "grub").mkdir(parents=True)
        shutil.copy(grub_cfg, files / "grub" / "grub.cfg")
        BootEnv.new({"boot_count": 0, "boot_limit": BOOT_LIMIT}).create(files / "grub" / "grubenv")
        _set_mtimes(files)
        image = out / "esp.fat"
        env = {"SOURCE_DATE_EPOCH": str(EPOCH), "MTOOLS_SKIP_CHECK": "1"}
        # No volume label (-n): mkfs.fat stamps the label's directory entry with the current
        # time. mmd would too; mcopy -s -m copies the directory with its fixed mtime.
        run(["mkfs.fat", "-C", "-F", "16", "-i", ESP_VOLUME_ID, image, str(PARTITIONS[0][2] * 1024)], env=env)
        run(["mcopy", "-s", "-m", "-i", image, files / "grub", "::"], env=env)
        shutil.rmtree(files)

    inputs = {
        "grub.cfg": sha256_file(grub_cfg),
        "grubenv": sha256_bytes(grubenv_initial()),
        "dosfstools": package_version("dosfstools"),
        "mtools": package_version("mtools"),
        "epoch": EPOCH,
        "size": PARTITIONS[0][2],
    }
    return cache.stage("esp", inputs, build)


def stage_grub(cache: Cache) -> Path:
    def build(out: Path) -> None:
        shutil.copy(GRUB_DIR / "boot.img", out / "boot.img")
        run(["grub-mkimage", "-O", "i386-pc", "-o", out / "core.img", "-p", GRUB_PREFIX, *GRUB_MODULES])

    inputs = {"grub-pc-bin": package_version("grub-pc-bin"), "modules": GRUB_MODULES, "prefix": GRUB_PREFIX}
    return cache.stage("grub", inputs, build)


# --------------------------------------------------------------------------- OS root

OS_RELEASE = """\
PRETTY_NAME="QMR lab OS 1.0"
NAME="QMR lab OS"
ID=qmr-lab
VERSION_ID=1.0
VERSION="1.0"
"""


def channel_file(source: str) -> bytes:
    """The bytes of a channel file the lab knows by name (``channel:bad-291``, ...)."""
    template, content, seed = CHANNEL_FILES[source]
    return _mkchannel().build(template, content, seed=seed)


def _source_bytes(source: str, sensor_dir: Path) -> bytes:
    if source in CHANNEL_FILES:
        return channel_file(source)
    if source.startswith("sensor:"):
        return (sensor_dir / source.removeprefix("sensor:") / "sensor.ko").read_bytes()
    raise ScenarioError(f"unknown source {source!r}")


def _os_root(
    root: Path,
    kernel_dir: Path,
    kernel: KernelPackages,
    sensor_dir: Path,
    initramfs_dir: Path,
    runtime: RuntimeArtifact,
) -> None:
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
    _install_busybox(root, skip={"sbin/init"})
    _install_agent(root, runtime)
    _write(root / "sbin" / "init", (IMAGES / "os" / "init").read_bytes(), 0o755)
    _write(root / "sbin" / "health-check", (IMAGES / "os" / "health-check").read_bytes(), 0o755)
    _write(root / "lib" / "qmr.sh", (IMAGES / "os" / "lib.sh").read_bytes())
    _write(root / "etc" / "init.d" / "S10-early", (IMAGES / "os" / "S10-early").read_bytes(), 0o755)
    _write(root / "etc" / "early.conf", "# early boot settings: name=value\nconsole=ttyS0\n")
    _write(
        root / "etc" / "sensor" / "sensor.conf", "# sensor driver module options, one a line (e.g. hang=1)\n"
    )
    _write(root / "etc" / "os-release", OS_RELEASE)
    _write(root / "etc" / "hostname", "qmr-lab\n")
    _write(root / "boot" / "vmlinuz", (kernel_dir / "root/boot" / f"vmlinuz-{kernel.release}").read_bytes())
    _write(root / "boot" / "initrd.img", (initramfs_dir / "initrd.img").read_bytes())
    moddir = root / MODULES_DIR / kernel.release
    order = _install_modules(kernel_dir / "root", kernel.release, MODULES_OS, moddir)
    _write(moddir / MODULES_LIST, "\n".join(order) + "\n")
    _write(moddir / DRIVER_SUBDIRS[0] / "sensor.ko", (sensor_dir / "1.0" / "sensor.ko").read_bytes())
    _write(root / DRIVER_STORE / "sensor/1.0/sensor.ko", (sensor_dir / "1.0" / "sensor.ko").read_bytes())
    for name, source in BASE_CHANNELS.items():
        _write(root / CHANNEL_DIR / name, _source_bytes(source, sensor_dir))


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
            data = (
                change.content.encode()
                if change.content is not None
                else _source_bytes(change.source or "", sensor_dir)
            )
            _write(target, data, change.file_mode)
        elif change.action == "corrupt":
            # Deterministic damage: invert the first 64 bytes (the header of most formats).
            data = bytearray(target.read_bytes())
            for j in range(min(64, len(data))):
                data[j] ^= 0xFF
            _write(target, bytes(data), target.stat().st_mode & 0o7777)
        else:
            target.unlink()
    args = " ".join(scenario.kernel_args)
    _write(
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
    recipe = [IMAGES / "os" / n for n in ("init", "health-check", "lib.sh", "S10-early")]
    recipe.append(IMAGES / "sensor" / "mkchannel.py")

    def build(out: Path) -> None:
        root = out / "root"
        _os_root(root, kernel_dir, kernel, sensor_dir, initramfs_dir, runtime)
        apply_scenario(root, scenario, sensor_dir, kernel.release)
        _mkfs_ext4(root, out / "os.ext4", PARTITIONS[1][2], OS_UUID, OS_HASH_SEED, "qmr-os")
        shutil.rmtree(root)

    inputs = {
        "kernel": kernel.versions,
        "sensor": sensor_dir.name,
        "initramfs": initramfs_dir.name,
        "files": _files_hash(recipe),
        "scenario": scenario.source_sha256,
        "scenario_name": scenario.name,
        "busybox": package_version("busybox-static"),
        "e2fsprogs": package_version("e2fsprogs"),
        "epoch": EPOCH,
        "size": PARTITIONS[1][2],
        **_agent_inputs(runtime),
    }
    return cache.stage("os", inputs, build, scenario.name)


# --------------------------------------------------------------------------- disk


@dataclass(frozen=True)
class Artifact:
    """A built disk image for one scenario."""

    scenario: str
    image: Path  # raw disk image (never boot it directly: use a qcow2 overlay)
    manifest: Path  # manifest.json beside the image
    size: int  # bytes (apparent; the file is sparse)
    sha256: str
    kernel_release: str
    expect: dict = field(default_factory=dict)


def stage_disk(
    cache: Cache, scenario: Scenario, kernel: KernelPackages, parts_dirs: dict[str, Path], grub_dir: Path
) -> Path:
    def build(out: Path) -> None:
        parts = disk.layout(PARTITIONS)
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

    inputs = {name: d.name for name, d in parts_dirs.items()} | {"grub": grub_dir.name, "layout": PARTITIONS}
    return cache.stage("disk", inputs, build, scenario.name)


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
    FILES_BUSYBOX,
)


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
    runtime = build_python_runtime(cache.root, progress=log)
    initramfs_os = stage_initramfs(cache, kernel_dir, kernel, "os")
    initramfs_recovery = stage_initramfs(cache, kernel_dir, kernel, "recovery", runtime)
    recovery_dir = stage_recovery(cache, kernel_dir, kernel, initramfs_recovery)
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
