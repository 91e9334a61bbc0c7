"""The QEMU harness tests' guest: Debian's kernel and a busybox initramfs (no disk image).

``/init`` is ``tests/data/guest/init.sh``; what it does is chosen on the kernel command line
(``qmr.test=split|panic|watchdog|disk|idle``). Its crash is ``sysrq c``, so no module has to
be compiled: only the ``linux-image`` package is needed. The kernel comes from, in order:

1. ``$QMR_KERNEL_ROOT``: a directory with ``boot/vmlinuz-*`` and ``lib/modules/<version>/``
   (e.g. the ``kroot`` of ``tests/data/panic/src/capture.sh``);
2. an unpacked kernel under the lab's cache (``.cache/qmr``), e.g. the image builder's;
3. ``apt-get download linux-image-<version>`` (the current dependency of
   ``linux-image-amd64``, ~70 MB, once) unpacked with ``dpkg-deb -x`` into
   ``.cache/qmr/test-guest``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from recovery_lab import tools
from recovery_lab.locks import build_lock

REPO = Path(__file__).resolve().parent.parent
INIT = REPO / "tests/data/guest/init.sh"
CACHE = REPO / ".cache/qmr"
# Modules /init loads, relative to lib/modules/<version>/kernel.
MODULES = [
    "lib/reed_solomon/reed_solomon.ko",
    "fs/pstore/ramoops.ko",
    "drivers/misc/pvpanic/pvpanic.ko",
    "drivers/misc/pvpanic/pvpanic-mmio.ko",
    "drivers/watchdog/watchdog.ko",
    "drivers/watchdog/i6300esb.ko",
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/block/virtio_blk.ko",
]
RAMOOPS = (
    "memmap=1M$0x7f00000 ramoops.mem_address=0x7f00000 ramoops.mem_size=0x100000 "
    "ramoops.record_size=0x20000 ramoops.console_size=0x20000"
)


@dataclass(frozen=True)
class HarnessGuest:
    kernel: Path
    initrd: Path
    kernel_version: str

    def append(self, mode: str, extra: str = "") -> str:
        """The kernel command line for ``qmr.test=mode``."""
        return f"console=ttyS0 oops=panic panic=5 {RAMOOPS} qmr.test={mode} {extra}".strip()


def _kernel_root_ok(root: Path) -> tuple[Path, str] | None:
    for vmlinuz in sorted(root.glob("boot/vmlinuz-*")):
        version = vmlinuz.name.removeprefix("vmlinuz-")
        kmods = root / "lib/modules" / version / "kernel"
        if all((kmods / m).is_file() for m in MODULES):
            return vmlinuz, version
    return None


def find_kernel() -> tuple[Path, Path, str]:
    """(vmlinuz, lib/modules/<version>/kernel, version), downloading the kernel if needed."""
    candidates: list[Path] = []
    if os.environ.get("QMR_KERNEL_ROOT"):
        candidates.append(Path(os.environ["QMR_KERNEL_ROOT"]))
    if CACHE.is_dir():
        candidates += [p.parent.parent for p in sorted(CACHE.glob("**/boot/vmlinuz-*"))]
    for root in candidates:
        found = _kernel_root_ok(root)
        if found:
            vmlinuz, version = found
            return vmlinuz, root / "lib/modules" / version / "kernel", version
    work = CACHE / "test-guest"
    deb_dir = work / "deb"
    kroot = work / "kroot"
    deb_dir.mkdir(parents=True, exist_ok=True)
    depends = tools.run(["apt-cache", "depends", "linux-image-amd64"])
    versions = [
        ln.split("linux-image-", 1)[1].strip() for ln in depends.splitlines() if "Depends: linux-image-" in ln
    ]
    if not versions:
        raise RuntimeError("apt-cache knows no linux-image-amd64 dependency: run apt-get update")
    version = versions[0]
    tools.run(["apt-get", "download", f"linux-image-{version}"], cwd=deb_dir)
    for deb in deb_dir.glob(f"linux-image-{version}_*.deb"):
        tools.run(["dpkg-deb", "-x", str(deb), str(kroot)])
    found = _kernel_root_ok(kroot)
    if not found:
        raise RuntimeError(f"linux-image-{version} unpacked into {kroot} lacks vmlinuz or modules")
    return found[0], kroot / "lib/modules" / version / "kernel", version


def build_harness_guest() -> HarnessGuest:
    """Build (or reuse from ``.cache/qmr/test-guest``) the initramfs for the harness tests. One
    build at a time (``test-guest.lock``): a second test worker waits, then reuses it."""
    with build_lock(CACHE / "test-guest.lock", log=lambda line: None):
        return _build_harness_guest()


def _build_harness_guest() -> HarnessGuest:
    tools.require("cpio", "gzip", "/bin/busybox")
    vmlinuz, kmods, version = find_kernel()
    key = hashlib.sha256(INIT.read_bytes() + version.encode()).hexdigest()[:12]
    out = CACHE / "test-guest" / key
    initrd = out / "initrd.gz"
    if not initrd.is_file():
        root = out / "root"
        shutil.rmtree(root, ignore_errors=True)
        for d in ("bin", "proc", "sys", "dev", "tmp", "lib/modules"):
            (root / d).mkdir(parents=True)
        shutil.copy2("/bin/busybox", root / "bin/busybox")
        (root / "bin/sh").symlink_to("busybox")  # /init's #!/bin/sh must exist before --install
        shutil.copy2(INIT, root / "init")
        (root / "init").chmod(0o755)
        for m in MODULES:
            shutil.copy2(kmods / m, root / "lib/modules" / Path(m).name)
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        cpio = out / "initrd.cpio"
        tools.run(
            ["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"],
            cwd=root,
            input=("\n".join(["."] + files) + "\n").encode(),
            stdout_to=cpio,
        )
        tools.run(["gzip", "-9", "-n", "-f", str(cpio)])
        (out / "initrd.cpio.gz").rename(initrd)
        shutil.rmtree(root)
    return HarnessGuest(kernel=vmlinuz, initrd=initrd, kernel_version=version)
