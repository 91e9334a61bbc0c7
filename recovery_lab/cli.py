"""``recovery-lab``: run the recovery loop in the lab.

demo     the whole loop on this machine, with a directory standing in for the VM's disks
build    the disk images of the scenarios in images/scenarios (cached; see images/README.md)
boot     boot one scenario's disk image in QEMU and print the timeline of what happened
run      the whole recovery loop in QEMU: server, failed boots, agent, approval, fix, healthy boot
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .build import BuildError, build_images
from .dirdemo import DemoError, run_demo
from .faults import FAULTS
from .scenario import ScenarioError
from .tools import ToolError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="recovery-lab",
        description="Quick Machine Recovery lab",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the recovery loop without a VM (server, agent, two admins)")
    d.add_argument("--workdir", type=Path, help="keep everything here (default: a new temp dir)")
    b = sub.add_parser("build", help="build (or take from the cache) the scenarios' disk images")
    b.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help="scenario names or .toml files (default: all in images/scenarios)",
    )
    b.add_argument(
        "--cache", type=Path, help="cache directory (default: $QMR_CACHE, else .cache/qmr in the checkout)"
    )
    _add_boot_parser(sub)
    _add_run_parser(sub)
    args = p.parse_args(argv)
    if args.cmd == "boot":
        return _boot(args)
    if args.cmd == "run":
        return _run(args)
    if args.cmd == "build":
        return _build(args.scenarios, args.cache)
    if args.cmd == "demo":
        try:
            run_demo(args.workdir)
        except DemoError as exc:
            print(f"recovery-lab demo: {exc}", file=sys.stderr)
            return 1
    return 0


def _build(scenarios: list[str], cache: Path | None) -> int:
    import time

    started = time.monotonic()
    try:
        artifacts = build_images(scenarios or None, cache, log=lambda line: print(line, flush=True))
    except (BuildError, ScenarioError, ToolError) as exc:
        print(f"recovery-lab build: {exc}", file=sys.stderr)
        return 1
    for a in artifacts:
        print(f"{a.scenario}: {a.image} ({a.size // (1024 * 1024)} MiB, sha256 {a.sha256})")
    print(f"done in {time.monotonic() - started:.1f}s")
    return 0


# --------------------------------------------------------------------------- boot (QEMU harness)


def _add_boot_parser(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("boot", help="boot a scenario's disk image in QEMU and print its timeline")
    b.add_argument(
        "scenario",
        metavar="SCENARIO",
        help="scenario name or .toml file (its image is built or taken from the cache)",
    )
    b.add_argument("--image", type=Path, help="boot this disk image instead of building one")
    b.add_argument(
        "--timeout", type=float, default=300.0, help="stop the VM after this many seconds (default 300)"
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


def _boot(args: argparse.Namespace) -> int:
    import json
    import logging

    from .boot import boot_scenario
    from .qemu import QemuError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    image = args.image
    try:
        if image is None:
            from .build import BuildError, build_image

            try:
                image = build_image(args.scenario, log=lambda line: print(line, flush=True)).image
            except (BuildError, ScenarioError, ToolError) as exc:
                print(f"recovery-lab boot: {exc}", file=sys.stderr)
                return 1
        report = boot_scenario(
            image,
            timeout=args.timeout,
            keep_logs=args.keep,
            run_dir=args.run_dir,
            stop_on=args.stop_on,
            accel=args.accel,
        )
    except (QemuError, ToolError, FileNotFoundError) as exc:
        print(f"recovery-lab boot: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_json(), indent=1) if args.json else report.render())
    return 2 if report.outcome in ("timed-out", "qemu-exited") else 0


# --------------------------------------------------------------------------- run (the whole loop)


def _add_run_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("run", help="the whole recovery loop in QEMU, with a recovery server")
    r.add_argument("scenario", metavar="SCENARIO", help="scenario name or .toml file")
    r.add_argument(
        "--auto-approve",
        action="store_true",
        help="the lab writes and approves the catalog's fix as two lab people "
        "(default: wait for a person with recovery-admin)",
    )
    r.add_argument("--report", type=Path, help="write the JSON report here")
    r.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    r.add_argument("--workdir", type=Path, help="keep the run's files here (default: a temp dir)")
    r.add_argument("--keep", action="store_true", help="keep the VM's disk overlay too")
    r.add_argument("--accel", default="tcg", choices=["tcg", "kvm"])
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
        choices=sorted(FAULTS),
        help="inject a fault; the run must then end the way the fault predicts instead of "
        "recovering (images/README.md): "
        + "; ".join(f"{name}: {text}" for name, text in sorted(FAULTS.items())),
    )


def _run(args: argparse.Namespace) -> int:
    import json
    import logging

    from .build import BuildError
    from .loop import RunOptions, render, run
    from .qemu import QemuError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    opts = RunOptions(
        scenario=args.scenario,
        auto_approve=args.auto_approve,
        timeout_s=args.timeout,
        workdir=args.workdir,
        keep=args.keep,
        accel=args.accel,
        retry_interval_min=args.retry_interval,
        time_to_reboot_min=args.time_to_reboot,
        max_recovery_attempts=args.max_attempts,
        fault=args.fault,
        log=lambda line: print(line, flush=True),
    )
    try:
        report = run(opts)
    except (BuildError, ScenarioError, ToolError, QemuError, FileNotFoundError) as exc:
        print(f"recovery-lab run: {exc}", file=sys.stderr)
        return 1
    print(report.boot.timeline.render() if report.boot else "")
    print(render(report))
    if args.report:
        args.report.write_text(json.dumps(report.to_json(), indent=1))
        print(f"report written to {args.report}")
    return 0 if report.met_expectations else 3


if __name__ == "__main__":
    sys.exit(main())
