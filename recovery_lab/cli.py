"""``recovery-lab``: run the recovery loop in the lab.

  demo     the whole loop on this machine, with a directory standing in for the VM's disks
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .demo import DemoError, run_demo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="recovery-lab", description="Quick Machine Recovery lab",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the recovery loop without a VM (server, agent, two admins)")
    d.add_argument("--workdir", type=Path, help="keep everything here (default: a new temp dir)")
    args = p.parse_args(argv)
    if args.cmd == "demo":
        try:
            run_demo(args.workdir)
        except DemoError as exc:
            print(f"recovery-lab demo: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
