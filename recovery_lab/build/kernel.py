"""The kernel every lab machine runs, its modules, and the sensor driver built against it.

- :func:`resolve_kernel`: the kernel Debian's ``linux-image-amd64`` depends on now, and the
  exact version of each package the build downloads (image, headers, kbuild);
- :func:`stage_kernel`: ``apt-get download`` of those packages, unpacked into one root, the
  headers' Makefile fixed (images/sensor/NOTES.md pitfall 1), ``depmod`` run;
- :func:`install_modules`: the modules a root needs (:data:`MODULES_OS`,
  :data:`MODULES_RECOVERY`, ...) with their dependencies, in load order (:func:`module_closure`);
- :func:`stage_sensor`: ``images/sensor/sensor.c`` built against the headers, version 1.0
  (good) and 2.0 (crashes at init), stripped of debug info and build paths.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from recovery_agent.layout import MODULES_DIRS

from ..checkout import IMAGES
from ..tools import package_version, run
from .cache import BuildError, Cache, files_hash
from .files import write_file

KERNEL_META = "linux-image-amd64"
KBUILD = "linux-kbuild-6.1"

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

SENSOR_VARIANTS = {
    "1.0": "",
    "2.0": '-DSENSOR_VERSION=\\"2.0\\" -DSENSOR_BAD_DRIVER',
}


@dataclass(frozen=True)
class KernelPackages:
    """The exact Debian packages an image's kernel comes from."""

    release: str  # uname -r, e.g. 6.1.0-56-amd64
    versions: dict[str, str]  # package -> version


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
    return KernelPackages(release, apt_candidates(names))


def apt_candidates(names: Sequence[str]) -> dict[str, str]:
    """The version apt would install of each package (``apt-cache policy``'s candidate)."""
    versions = {}
    for name in names:
        policy = run(["apt-cache", "policy", name])
        m = re.search(r"Candidate:\s*(\S+)", policy)
        if not m or m.group(1) == "(none)":
            raise BuildError(f"apt knows no version of {name}: run apt-get update")
        versions[name] = m.group(1)
    return versions


def stage_kernel(cache: Cache, kernel: KernelPackages) -> Path:
    """The kernel packages unpacked into ``root/`` of the stage, ready to build modules against."""

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


def install_modules(kernel_root: Path, release: str, names: list[str], dest: Path) -> list[str]:
    """Copy ``names`` and their dependencies from the kernel tree into ``dest``
    (``lib/modules/<release>`` of a root); return their paths in load order."""
    order = module_closure(kernel_root, release, names)
    src = kernel_root / MODULES_DIR / release
    for rel in order:
        write_file(dest / rel, (src / rel).read_bytes())
    return order


def stage_sensor(cache: Cache, kernel_dir: Path, kernel: KernelPackages) -> Path:
    """``<version>/sensor.ko`` for each of :data:`SENSOR_VARIANTS`."""
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
        "sources": files_hash(sources),
        "variants": SENSOR_VARIANTS,
        "gcc": package_version("gcc-12"),
    }
    return cache.stage("sensor", inputs, build, kernel.release)
