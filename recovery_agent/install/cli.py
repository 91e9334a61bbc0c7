"""The install's commands, in ``recovery-agent`` and in ``python3 -m recovery_agent.install``.

install [--root DIR] --wheels DIR --settings FILE   set this machine (or a mounted image) up
uninstall [--root DIR] [--remove-key]              put back everything install changed
recovery-env [--root DIR] [--changed-kernel R]     rebuild the recovery environment (kernel hooks)
health-check                                       run the boot's health checks (a systemd unit)
mark-good                                          the boot is good: reset GRUB's boot count (a unit)

``python3 -m recovery_agent.install`` offers the same commands with the standard library
only: an install bundle runs it with Debian's python3 before the agent's runtime exists.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..bootenv import BootEnvError
from ..errors import AgentError
from . import InstallOptions, install, rebuild_recovery_env, uninstall
from .checks import mark_good, run_checks
from .manifest import ManifestError
from .target import FIRMWARES, InstallRefused

EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2


def _say(line: str) -> None:
    print(line, flush=True)


def cmd_install(args: argparse.Namespace) -> int:
    install(
        InstallOptions(
            root=Path(args.root),
            wheels=Path(args.wheels) if args.wheels else None,
            settings=Path(args.settings) if args.settings else None,
            firmware=args.firmware,
            boot_limit=args.boot_limit,
            panic_s=args.panic_timeout,
            panic_on_oops=args.panic_on_oops,
            recovery_modules=args.recovery_modules,
            extra_modules=tuple(args.extra_module),
            update_grub=args.update_grub,
            luks_unlock_key_file=Path(args.luks_unlock_key_file) if args.luks_unlock_key_file else None,
            escrow_key=Path(args.escrow_key) if args.escrow_key else None,
            tpm_sealed=args.tpm_sealed,
        ),
        say=_say,
    )
    return EXIT_OK


def cmd_uninstall(args: argparse.Namespace) -> int:
    uninstall(Path(args.root), remove_key=args.remove_key, update_grub=args.update_grub, say=_say)
    return EXIT_OK


def cmd_recovery_env(args: argparse.Namespace) -> int:
    rebuild_recovery_env(Path(args.root), changed_kernel=args.changed_kernel, say=_say)
    return EXIT_OK


def cmd_health_check(args: argparse.Namespace) -> int:
    return EXIT_OK if run_checks(Path(args.root), say=_say) else EXIT_FAILED


def cmd_mark_good(args: argparse.Namespace) -> int:
    mark_good(Path(args.root), say=_say)
    return EXIT_OK


def add_commands(sub: Any) -> None:
    """Add the install's commands to an argparse subparsers object."""
    i = sub.add_parser("install", help="set this machine (or a mounted image, --root) up for recovery")
    i.add_argument("--root", default="/", help="the machine's root (default /, the running system)")
    i.add_argument("--wheels", help="directory of the agent's wheels for the machine's Python")
    i.add_argument(
        "--settings", help="the fleet's agent settings (JSON: server_url, server_public_key, device_id)"
    )
    i.add_argument("--firmware", default="auto", choices=["auto", *FIRMWARES])
    i.add_argument(
        "--boot-limit", type=int, help="failed boots before recovery (1-9; default the settings', else 2)"
    )
    i.add_argument("--panic-timeout", type=int, default=10, help="seconds before a panicked kernel reboots")
    i.add_argument("--panic-on-oops", action="store_true", help="a kernel oops (a driver's crash) panics")
    i.add_argument("--recovery-modules", default="most", choices=["most", "dep"], help="mkinitramfs MODULES=")
    i.add_argument(
        "--extra-module", action="append", default=[], help="a module the recovery environment loads"
    )
    i.add_argument(
        "--update-grub",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run update-grub (default: on a running system only)",
    )
    i.add_argument(
        "--luks-unlock-key-file",
        help="a root on LUKS2: a key that opens it now (the machine's normal-boot key); QMR adds its "
        "own recovery key in a keyslot of its own and escrows it",
    )
    i.add_argument(
        "--escrow-key",
        help="a root on LUKS2: the server's signed escrow key (JSON, GET /v1/escrow-key); the recovery "
        "key is sealed to it at once, and the first health report delivers it",
    )
    i.add_argument(
        "--tpm-sealed",
        action="store_true",
        help="the device key is sealed in a TPM: the server may release the disk key with no person",
    )
    i.set_defaults(fn=cmd_install)
    u = sub.add_parser("uninstall", help="put back everything install changed")
    u.add_argument("--root", default="/")
    u.add_argument("--remove-key", action="store_true", help="remove the device key too")
    u.add_argument("--update-grub", action=argparse.BooleanOptionalAction, default=None)
    u.set_defaults(fn=cmd_uninstall)
    r = sub.add_parser("recovery-env", help="rebuild the recovery environment from the newest kernel")
    r.add_argument("--root", default="/")
    r.add_argument("--changed-kernel", help="the kernel a package just installed or removed (kernel hooks)")
    r.set_defaults(fn=cmd_recovery_env)
    h = sub.add_parser("health-check", help="run the boot's health checks (required.d, wanted.d)")
    h.add_argument("--root", default="/")
    h.set_defaults(fn=cmd_health_check)
    m = sub.add_parser("mark-good", help="the boot is good: reset GRUB's boot count")
    m.add_argument("--root", default="/")
    m.set_defaults(fn=cmd_mark_good)


# Invalid input or a machine the install cannot serve, rather than a failure.
REFUSALS = (InstallRefused, BootEnvError)


def main(argv: list[str] | None = None) -> int:
    """``python3 -m recovery_agent.install COMMAND``: the install's commands alone."""
    parser = argparse.ArgumentParser(
        prog="python3 -m recovery_agent.install",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_commands(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    try:
        code: int = args.fn(args)
        return code
    except (AgentError, OSError) as exc:
        print(f"recovery-agent: {exc}", file=sys.stderr)
        if isinstance(exc, ManifestError):
            return EXIT_FAILED
        return EXIT_REFUSED if isinstance(exc, REFUSALS) else EXIT_FAILED
