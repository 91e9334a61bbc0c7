#!/usr/bin/env python3
"""Benchmark the recovery environment's Python runtime under QEMU TCG.

Builds the runtime (recovery_lab.pyruntime, cached), packs it with busybox-static and a tiny
/init into a newc cpio initramfs, compresses it with each method Debian's kernel can unpack
(CONFIG_RD_GZIP/XZ/ZSTD/LZ4, read from the kernel's config), boots each under
``qemu-system-x86_64 -accel tcg`` and prints:

- the runtime tree's size and each initramfs's size;
- the time to ``Run /init`` (the kernel's printk timestamp: unpacking the initramfs is most
  of it under TCG);
- in the guest: interpreter start-up plus ``import recovery_agent.agent`` (from /proc/uptime)
  and the import alone (``time.perf_counter``); and the total up to that point;
- with ``--importtime``: the slowest imports of the first boot (``-X importtime``).

The kernel is the first ``boot/vmlinuz-*`` under the lab's cache (``$QMR_CACHE`` or
``.cache/qmr``), e.g. the image builder's; ``--kernel`` names one.

    .venv/bin/python scripts/bench_recovery_env.py [--compress gzip,zstd] [--importtime]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recovery_lab import tools  # noqa: E402
from recovery_lab.pyruntime import PYTHON, build_python_runtime  # noqa: E402
from recovery_lab.reproducible import set_mtimes  # noqa: E402

BOOT_TIMEOUT_S = 300

# Compressors the kernel can unpack, with the flags its decompressors need: xz only with
# CRC32 checks, lz4 only in the legacy frame format.
COMPRESSORS = {
    "gzip": ("CONFIG_RD_GZIP", ["gzip", "-9", "-n", "-c"]),
    "xz": ("CONFIG_RD_XZ", ["xz", "-9", "--check=crc32", "-T1", "-c"]),
    "zstd": ("CONFIG_RD_ZSTD", ["zstd", "-19", "-q", "-T1", "-c"]),
    "lz4": ("CONFIG_RD_LZ4", ["lz4", "-l", "-9", "-q", "-c"]),
}

INIT = f"""#!/bin/sh
export PATH=/bin
/bin/busybox mount -t proc proc /proc
# Python needs /dev/urandom when getrandom() would still block this early in boot.
/bin/busybox mount -t devtmpfs dev /dev
up() {{ cut -d' ' -f1 /proc/uptime; }}
echo "QMR-BENCH init $(up)"
/{PYTHON} -I -c '
import time
t = time.perf_counter()
import recovery_agent.agent
print("QMR-BENCH import %.3f" % (time.perf_counter() - t))'
echo "QMR-BENCH python-done $(up)"
if grep -q qmr.importtime /proc/cmdline; then
    /{PYTHON} -I -X importtime -c 'import recovery_agent.agent' 2>/tmp/importtime
    echo "QMR-BENCH importtime-begin"
    sort -t'|' -k2 -n /tmp/importtime | tail -n 25
    echo "QMR-BENCH importtime-end"
fi
echo "QMR-BENCH end $(up)"
/bin/busybox poweroff -f
"""


def find_kernel(cache: Path, explicit: str | None) -> tuple[Path, Path | None]:
    """(vmlinuz, its config-* or None)."""
    if explicit:
        vmlinuz = Path(explicit)
    else:
        found = sorted(cache.glob("**/boot/vmlinuz-*"))
        if not found:
            sys.exit(f"no kernel under {cache}: run recovery-lab build first, or pass --kernel")
        vmlinuz = found[0]
    config = vmlinuz.with_name(vmlinuz.name.replace("vmlinuz-", "config-"))
    return vmlinuz, config if config.is_file() else None


def kernel_supports(config: Path | None, option: str) -> bool:
    if config is None:
        return option == "CONFIG_RD_GZIP"
    return re.search(rf"^{option}=y$", config.read_text(), re.M) is not None


def stage(runtime_root: Path, work: Path) -> Path:
    root = work / "initramfs"
    shutil.copytree(runtime_root, root, symlinks=True)
    for d in ("bin", "proc", "sys", "dev", "tmp"):
        (root / d).mkdir(exist_ok=True)
    busybox = Path(next(p for p, pkg in tools.FILES.items() if pkg == "busybox-static"))
    tools.require(str(busybox))
    shutil.copyfile(busybox, root / "bin/busybox")
    os.chmod(root / "bin/busybox", 0o755)
    for applet in ("sh", "cut", "grep", "sort", "tail", "cat"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "init").write_text(INIT)
    os.chmod(root / "init", 0o755)
    set_mtimes(root)
    return root


def pack(root: Path, out: Path) -> Path:
    names = ["."] + sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    tools.run(
        ["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0", "--reproducible"],
        cwd=root,
        input=("\n".join(names) + "\n").encode(),
        stdout_to=out,
    )
    return out


def boot(vmlinuz: Path, initrd: Path, importtime: bool, log: Path) -> dict[str, float | str]:
    append = "console=ttyS0 panic=-1" + (" qmr.importtime" if importtime else "")
    started = time.monotonic()
    out = tools.run(
        [
            "timeout",
            str(BOOT_TIMEOUT_S),
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-m",
            "512",
            "-smp",
            "1",
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
            "-kernel",
            vmlinuz,
            "-initrd",
            initrd,
            "-append",
            append,
        ]
    )
    wall = time.monotonic() - started
    log.write_text(out)
    result: dict[str, float | str] = {"wall": wall}
    m = re.search(r"\[\s*([\d.]+)\] Run /init as init process", out)
    if m:
        result["run_init"] = float(m[1])
    for key in ("init", "import", "python-done", "end"):
        m = re.search(rf"QMR-BENCH {key} ([\d.]+)", out)
        if m:
            result[key] = float(m[1])
    m = re.search(r"QMR-BENCH importtime-begin\r?\n(.*?)QMR-BENCH importtime-end", out, re.S)
    if m:
        result["importtime"] = m[1]
    if "end" in result:
        # QEMU start-up, firmware and the kernel decompressing itself happen before the
        # kernel's clock starts: the host's wall time minus the guest's uptime at the end.
        result["pre_kernel"] = wall - float(result["end"])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("QMR_CACHE", REPO / ".cache/qmr")))
    parser.add_argument("--kernel", help="a vmlinuz (default: the first in the cache)")
    parser.add_argument(
        "--compress", default="gzip,xz,zstd,lz4", help="comma-separated, of " + ", ".join(COMPRESSORS)
    )
    parser.add_argument(
        "--importtime",
        action="store_true",
        help="also print the slowest imports (-X importtime) of the first boot",
    )
    parser.add_argument("--no-boot", action="store_true", help="only build and pack")
    args = parser.parse_args()

    tools.require("cpio", "qemu-system-x86_64", "timeout")
    runtime = build_python_runtime(args.cache)
    vmlinuz, config = find_kernel(args.cache, args.kernel)
    print(f"kernel: {vmlinuz} (config: {config or 'not found, gzip only'})")
    rows = []
    with tempfile.TemporaryDirectory(prefix="qmr-bench-", dir=args.cache) as tmp:
        work = Path(tmp)
        root = stage(runtime.root, work)
        cpio = pack(root, work / "initramfs.cpio")
        print(
            f"runtime tree: {runtime.size_bytes / 1e6:.1f} MB in {runtime.files} files; "
            f"cpio with busybox and /init: {cpio.stat().st_size / 1e6:.1f} MB"
        )
        first = True
        for method in args.compress.split(","):
            option, cmd = COMPRESSORS[method]
            if not kernel_supports(config, option):
                print(f"{method}: skipped, the kernel lacks {option}")
                continue
            out = work / f"initramfs.cpio.{method}"
            t0 = time.monotonic()
            tools.run([*cmd, cpio], stdout_to=out)
            pack_s = time.monotonic() - t0
            row: dict[str, float | str] = {"method": method, "size": out.stat().st_size, "pack_s": pack_s}
            if not args.no_boot:
                log = args.cache / f"bench-boot-{method}.log"
                row.update(boot(vmlinuz, out, args.importtime and first, log))
                first = False
            rows.append(row)
            print(_row(row), flush=True)
    print()
    print(
        "Run /init, py+import (interpreter start-up and the import) and total (at the end of "
        "the import) are\nguest uptime; pre-kernel is QEMU, firmware and kernel "
        "decompression (host wall - uptime)."
    )
    print(
        f"{'method':6} {'initramfs':>10} {'pack':>6} {'Run /init':>10} {'py+import':>10} "
        f"{'import':>7} {'total':>7} {'pre-kernel':>10} {'qemu wall':>10}"
    )
    for row in rows:
        print(_row(row))
    for row in rows:
        if "importtime" in row:
            print(
                f"\nslowest imports ({row['method']} boot, -X importtime, self us | cumulative us | module):"
            )
            print(row["importtime"])
    return 0


def _row(row: dict[str, float | str]) -> str:
    def f(key: str, unit: str = "s") -> str:
        v = row.get(key)
        return f"{v:.2f}{unit}" if isinstance(v, float) else "-"

    py = (row["python-done"] - row["init"]) if "python-done" in row and "init" in row else None
    return (
        f"{row['method']:6} {int(row['size']) / 1e6:>8.1f}MB {f('pack_s'):>6} "
        f"{f('run_init'):>10} {(f'{py:.2f}s' if py is not None else '-'):>10} "
        f"{f('import'):>7} {f('python-done'):>7} {f('pre_kernel'):>10} {f('wall'):>10}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
