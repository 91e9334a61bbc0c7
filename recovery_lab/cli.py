"""``recovery-lab``: build broken machines and run the recovery loop on them.

commands:
  demo     the whole loop on this machine, with a directory standing in for the VM's disks
  build    the disk images of the scenarios in images/scenarios (cached; see images/README.md)
  boot     boot one scenario's disk image in QEMU and print the timeline of what happened
  run      the whole recovery loop in QEMU: server, failed boots, agent, approval, fix, healthy boot
  example-image  a Debian 12 disk image as a user has one (GPT, GRUB, a vendor's driver, no QMR),
           to try --image with
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from recovery_agent.holds import HOLD_STEPS

from .boot import DEFAULT_TIMEOUT_S, boot_scenario
from .build import build_image, build_images, cache
from .dirdemo import DemoError, run_demo
from .errors import LabError
from .faults import DEFAULT_POWER_LOSS_AT, FAULTS

# The machines a scenario can be built on (recovery_lab.build, recovery_lab.build.debian).
BASES = ("lab", "debian")

EXIT_CODES = """\
exit codes:
  0  done: the images are built; the boot ended with the guest powering off (or at --stop-on);
     the run recovered the machine, or ended the way its --fault predicts; the demo's checks
     passed
  1  the run was made but missed its expectations: the boot timed out or QEMU died, the
     machine did not recover (the report lists why), a demo step or check failed
  2  the run could not be made: bad usage, a bad scenario file, a missing tool (the message
     names the package), an image that does not build, QEMU that does not start
  (3, "server unreachable", does not apply: the lab runs its own server)
"""

if TYPE_CHECKING:
    _SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="recovery-lab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXIT_CODES,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    _add_demo_parser(sub)
    _add_build_parser(sub)
    _add_boot_parser(sub)
    _add_run_parser(sub)
    _add_example_parser(sub)
    _add_cache_parser(sub)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if hasattr(args, "base") and (refused := _resolve_base(args, args.cmd)) is not None:
        return refused
    try:
        code: int = args.func(args)
    except DemoError as exc:
        print(f"recovery-lab {args.cmd}: {exc}", file=sys.stderr)
        return 1
    except LabError as exc:
        print(f"recovery-lab {args.cmd}: {exc}", file=sys.stderr)
        return 2
    return code


def _parser(sub: _SubParsers, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=help,
        description=help,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _say(line: str) -> None:
    print(line, flush=True)


# --------------------------------------------------------------------------- demo


def _add_demo_parser(sub: _SubParsers) -> None:
    d = _parser(sub, "demo", "the recovery loop without a VM (server, agent, two admins)")
    d.add_argument("--workdir", type=Path, help="keep everything here (default: a new temp dir)")
    d.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    run_demo(args.workdir)
    return 0


# --------------------------------------------------------------------------- cache


def _add_cache_parser(sub: _SubParsers) -> None:
    c = _parser(sub, "cache", "the build cache: remove the stages not used for some days")
    c.add_argument("action", choices=["prune"])
    c.add_argument(
        "--cache", type=Path, help="cache directory (default: $QMR_CACHE, else .cache/qmr in the checkout)"
    )
    c.add_argument(
        "--unused-days",
        type=float,
        default=cache.PRUNE_DAYS,
        help=f"remove the stages last used (built or taken) longer ago (default {cache.PRUNE_DAYS})",
    )
    c.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    c.set_defaults(func=_cache)


def _cache(args: argparse.Namespace) -> int:
    root = args.cache or cache.default_cache_dir()
    pruned = cache.prune(root, args.unused_days, dry_run=args.dry_run)
    for name in pruned.removed:
        print(f"  {name}")
    verb = "would remove" if args.dry_run else "removed"
    print(
        f"recovery-lab cache: {verb} {len(pruned.removed)} stage(s) of {root} unused for "
        f"{args.unused_days:g} days ({pruned.freed_bytes / 1e9:.1f} GB)"
    )
    return 0


# --------------------------------------------------------------------------- build


def _add_build_parser(sub: _SubParsers) -> None:
    b = _parser(sub, "build", "build (or take from the cache) the scenarios' disk images")
    b.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help="scenario names or .toml files (default: all in images/scenarios)",
    )
    b.add_argument(
        "--cache", type=Path, help="cache directory (default: $QMR_CACHE, else .cache/qmr in the checkout)"
    )
    b.add_argument(
        "--base",
        choices=BASES,
        help="lab: the lab's busybox OS (fast; the default); debian: stock Debian 12 with QMR "
        "installed by recovery-agent install (needs root, mmdebstrap; the first build takes many "
        "minutes), or with --image your own",
    )
    _debian_options(b)
    b.set_defaults(func=_build)


def _debian_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--firmware",
        choices=["bios", "uefi"],
        help="the Debian base's firmware: bios (SeaBIOS, grub-pc; the default) or uefi (OVMF, "
        "grub-efi-amd64); with --image, read from the image's GRUB package; the lab's base boots bios only",
    )
    p.add_argument(
        "--no-panic-on-oops",
        dest="panic_on_oops",
        action="store_false",
        help="the Debian base installed without --panic-on-oops: a driver's oops leaves the boot "
        "going and the failed health check reboots",
    )
    p.add_argument(
        "--image",
        type=Path,
        metavar="PATH",
        help="your own disk image (raw or qcow2) of a Debian-family system to build the Debian base "
        "from (implies --base debian; only read, never written; what it needs: docs/own-image.md)",
    )
    p.add_argument(
        "--encrypted",
        action="store_true",
        help="the Debian base with its root on LUKS2, opened at a normal boot by an emulated TPM; the "
        "recovery environment gets the disk key from the server (implies --base debian)",
    )


def _resolve_base(args: argparse.Namespace, command: str) -> int | None:
    """Settle --base (lab unless --image) and refuse what only the Debian base does on the
    lab's (one firmware, panics on an oops, no --image)."""
    if args.base is None:
        args.base = "debian" if args.image or args.encrypted else "lab"
    if args.base == "lab" and (
        args.firmware not in (None, "bios") or not args.panic_on_oops or args.image or args.encrypted
    ):
        option = (
            "--image"
            if args.image
            else "--encrypted"
            if args.encrypted
            else "--firmware uefi"
            if args.firmware not in (None, "bios")
            else "--no-panic-on-oops"
        )
        print(
            f"recovery-lab {command}: the lab's base boots BIOS, panics on an oops and is built by the lab: "
            f"use --base debian for {option}",
            file=sys.stderr,
        )
        return 2
    if args.image is None and args.firmware is None:
        args.firmware = "bios"
    return None


def _build(args: argparse.Namespace) -> int:
    started = time.monotonic()
    if args.base == "debian":
        from .build.debian import build_debian_image

        for name in args.scenarios or ["channel-file"]:
            image = build_debian_image(
                name,
                args.cache,
                log=_say,
                firmware=args.firmware,
                panic_on_oops=args.panic_on_oops,
                image=args.image,
                encrypted=args.encrypted,
            )
            made_from = "Debian" if args.image is None else f"from {args.image}"
            made_from += ", root on LUKS2" if image.encrypted else ""
            facts = f"{made_from}, kernel {image.kernel_release}, {image.firmware}"
            print(f"{image.scenario}: {image.image} ({facts})")
        print(f"done in {time.monotonic() - started:.1f}s")
        return 0
    artifacts = build_images(args.scenarios or None, args.cache, log=_say)
    for a in artifacts:
        print(f"{a.scenario}: {a.image} ({a.size // (1024 * 1024)} MiB, sha256 {a.sha256})")
    print(f"done in {time.monotonic() - started:.1f}s")
    return 0


# --------------------------------------------------------------------------- boot (QEMU harness)


def _add_boot_parser(sub: _SubParsers) -> None:
    b = _parser(sub, "boot", "boot a scenario's disk image in QEMU and print its timeline")
    b.add_argument(
        "scenario",
        metavar="SCENARIO",
        help="scenario name or .toml file (its image is built or taken from the cache)",
    )
    b.add_argument("--image", type=Path, help="boot this disk image instead of building one")
    b.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"stop the VM after this many seconds (default {DEFAULT_TIMEOUT_S:g})",
    )
    b.add_argument(
        "--keep",
        action="store_true",
        help="keep the run directory (console.log, events.jsonl, ...) even on success",
    )
    b.add_argument("--run-dir", type=Path, help="put the run directory here")
    b.add_argument(
        "--stop-on",
        metavar="REGEX",
        help="stop once the console matches REGEX (default: run until power-off)",
    )
    b.add_argument(
        "--accel",
        default="tcg",
        choices=["tcg", "kvm"],
        help="QEMU accelerator (default tcg; kvm only where /dev/kvm works)",
    )
    b.add_argument("--json", action="store_true", help="print the report as JSON")
    b.set_defaults(func=_boot)


def _boot(args: argparse.Namespace) -> int:
    image = args.image or build_image(args.scenario, log=_say).image
    report = boot_scenario(
        image,
        timeout=args.timeout,
        keep_logs=args.keep,
        run_dir=args.run_dir,
        stop_on=args.stop_on,
        accel=args.accel,
    )
    print(json.dumps(report.to_json(), indent=1) if args.json else report.render())
    return 1 if report.outcome in ("timed-out", "qemu-exited") else 0


# --------------------------------------------------------------------------- run (the whole loop)


def _add_run_parser(sub: _SubParsers) -> None:
    r = _parser(sub, "run", "the whole recovery loop in QEMU, with a recovery server")
    r.add_argument("scenario", metavar="SCENARIO", help="scenario name or .toml file")
    r.add_argument(
        "--auto-approve",
        action="store_true",
        help="the lab writes and approves the catalog's fix as two lab people "
        "(default: wait for a person with recovery-admin)",
    )
    r.add_argument(
        "--fleet",
        type=int,
        default=0,
        metavar="N",
        help="surround the machine with N simulated devices over HTTP (an emulation: healthy ones "
        "send their inventories, a third crash the same way), so the correlation of the fleet's "
        "files can name a culprit the catalog does not know (silent-channel-file)",
    )
    r.add_argument(
        "--recovery-test",
        action="store_true",
        help="test mode: an operator asks the machine for a recovery test before it boots (use a "
        "healthy scenario); the run passes if it visits recovery, changes nothing on the OS, boots "
        "back healthy and the server records the pass",
    )
    r.add_argument("--report", type=Path, help="write the JSON report here")
    r.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    r.add_argument("--workdir", type=Path, help="keep the run's files here (default: a temp dir)")
    r.add_argument("--keep", action="store_true", help="keep the VM's disk overlay too")
    r.add_argument("--accel", default="tcg", choices=["tcg", "kvm"])
    r.add_argument(
        "--base",
        choices=BASES,
        help="the machine: lab (busybox OS; the default) or debian (stock Debian 12, or with --image "
        "your own, QMR installed by its installer)",
    )
    _debian_options(r)
    r.add_argument(
        "--retry-interval",
        type=int,
        default=5,
        metavar="MIN",
        help="QMR retry interval, in lab minutes of one second (default 5)",
    )
    r.add_argument(
        "--time-to-reboot",
        type=int,
        default=90,
        metavar="MIN",
        help="QMR time to reboot, in lab minutes of one second (default 90)",
    )
    r.add_argument(
        "--max-attempts",
        type=int,
        default=3,
        help="recovery attempts before the device needs a person (default 3)",
    )
    r.add_argument(
        "--fault",
        dest="faults",
        action="append",
        default=[],
        choices=sorted(FAULTS),
        metavar="NAME",
        help="inject a fault (repeat to combine faults that disturb different moments); the run "
        "must then end the way the faults predict (images/README.md): "
        + "; ".join(f"{name}: {text}" for name, text in sorted(FAULTS.items())),
    )
    r.add_argument(
        "--power-loss-at",
        default=",".join(DEFAULT_POWER_LOSS_AT),
        metavar="STEPS",
        help="with --fault power-loss: the apply's steps to cut the power at, one per recovery "
        f"visit, comma-separated, of {', '.join(HOLD_STEPS)} (default {','.join(DEFAULT_POWER_LOSS_AT)})",
    )
    r.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # The loop runs a recovery server in this process: its stack is imported only for `run`.
    from .loop import RunOptions, run
    from .runreport import render

    opts = RunOptions(
        scenario=args.scenario,
        auto_approve=args.auto_approve,
        fleet=args.fleet,
        recovery_test=args.recovery_test,
        timeout_s=args.timeout,
        workdir=args.workdir,
        keep=args.keep,
        accel=args.accel,
        retry_interval_min=args.retry_interval,
        time_to_reboot_min=args.time_to_reboot,
        max_recovery_attempts=args.max_attempts,
        faults=args.faults,
        power_loss_at=tuple(step for step in args.power_loss_at.split(",") if step),
        base=args.base,
        firmware=args.firmware,
        panic_on_oops=args.panic_on_oops,
        image=args.image,
        encrypted=args.encrypted,
        log=_say,
    )
    try:
        report = run(opts)
    except ValueError as exc:  # a fault list that cannot be run (make_faults says why)
        print(f"recovery-lab run: {exc}", file=sys.stderr)
        return 2
    print(report.boot.timeline.render() if report.boot else "")
    print(render(report))
    if args.report:
        args.report.write_text(json.dumps(report.to_json(), indent=1))
        print(f"report written to {args.report}")
    return 0 if report.met_expectations else 1


# --------------------------------------------------------------------------- example-image


def _add_example_parser(sub: _SubParsers) -> None:
    e = _parser(
        sub,
        "example-image",
        "write a Debian 12 disk image as a user has one (GPT, /boot on the root, GRUB installed by "
        "the machine, the vendor's sensor driver, no QMR) to try --image with",
    )
    e.add_argument("out", type=Path, metavar="OUT.qcow2", help="where to write the image (qcow2)")
    e.add_argument("--firmware", default="bios", choices=["bios", "uefi"], help="how it boots (default bios)")
    e.add_argument(
        "--cache", type=Path, help="cache directory (default: $QMR_CACHE, else .cache/qmr in the checkout)"
    )
    e.set_defaults(func=_example)


def _example(args: argparse.Namespace) -> int:
    import os

    from .build.cache import BuildError, Cache, default_cache_dir
    from .build.userimage import make_example_image

    if os.geteuid() != 0:
        raise BuildError("the example image needs root (mmdebstrap, chroot, dpkg -i into the tree)")
    cache = Cache((args.cache or default_cache_dir()).resolve(), _say)
    cache.root.mkdir(parents=True, exist_ok=True)
    out = make_example_image(args.out, cache, args.firmware, _say)
    print(f"example image written to {out}: try recovery-lab run SCENARIO --image {out} --auto-approve")
    return 0


if __name__ == "__main__":
    sys.exit(main())
