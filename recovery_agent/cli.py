"""``recovery-agent``: the device side.

keygen PATH          make a device key (PATH, 0600) and PATH.pub
enroll --token T     enroll this device's key with the server (while healthy)
run                  the recovery loop (in the recovery environment); exit code = Outcome
health               the OS's health check passed: reset counters, report a good boot
inspect              print the diagnostics the agent would send, without sending them
undo DIRECTIVE_ID    put back what a directive changed
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import sys
import uuid
from pathlib import Path

from . import __version__
from .agent import Outcome, RecoveryAgent, Timeline, report_health
from .bootenv import BootEnv, BootEnvError
from .errors import RemediationError
from .protocol.client import DeviceClient
from .protocol.envelope import seal_bytes
from .protocol.errors import ProtocolError
from .protocol.keys import SigningKey, public_b64
from .protocol.wire import Enrollment, utcnow
from .remediate import undo
from .settings import AgentSettings, SettingsError

DEFAULT_CONFIG = "/etc/recovery/agent.json"


def _print(line: str) -> None:
    print(line, flush=True)


def cmd_keygen(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.exists() and not args.force:
        print(f"recovery-agent: {path} exists; keeping it (use --force to replace)", file=sys.stderr)
        return 0
    key = SigningKey.generate()
    key.save(path)
    print(f"device key {key.key_id} written to {path} and {path}.pub")
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    s = AgentSettings.load(args.config)
    if not s.device_key.exists():
        SigningKey.generate().save(s.device_key)
    key = SigningKey.load(s.device_key)
    msg = Enrollment(
        device_id=s.device_id,
        public_key=public_b64(key.public),
        enrollment_token=args.token,
        hostname=socket.gethostname(),
        created_at=utcnow(),
    )

    async def go() -> dict:
        async with DeviceClient(s.server_url) as client:
            return await client.enroll(seal_bytes(msg, key))

    answer = asyncio.run(go())
    print(f"device {answer['device_id']}: {answer['status']} (key {answer['key_id'][:16]}…)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    s = AgentSettings.load(args.config)
    agent = RecoveryAgent(s, timeline=Timeline(sink=_print))
    outcome = asyncio.run(agent.run())
    _print(f"recovery-agent: outcome {outcome.name} (exit {int(outcome)})")
    return int(outcome)


def cmd_health(args: argparse.Namespace) -> int:
    s = AgentSettings.load(args.config)
    boot_id = args.boot_id or _boot_id()
    answer = asyncio.run(report_health(s, boot_id, args.kernel or ""))
    print(f"health reported for boot {boot_id}: {answer['status']}")
    return 0


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return str(uuid.uuid4())


def cmd_inspect(args: argparse.Namespace) -> int:
    s = AgentSettings.load(args.config)
    agent = RecoveryAgent(s)
    env = BootEnv.read(s.grubenv)
    base = agent.collect(env.boot_count, 0)
    print(
        json.dumps(
            {
                k: (
                    v.model_dump(mode="json")
                    if hasattr(v, "model_dump")
                    else [x.model_dump(mode="json") for x in v]
                    if isinstance(v, list)
                    else v
                )
                for k, v in base.items()
            },
            indent=2,
        )
    )
    return 0


def cmd_undo(args: argparse.Namespace) -> int:
    s = AgentSettings.load(args.config)
    for line in undo(s.os_root, args.directive_id):
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="recovery-agent",
        description="Quick Machine Recovery agent",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--version", action="version", version=__version__)
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"agent settings (default {DEFAULT_CONFIG})")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("keygen", help="make a device key")
    k.add_argument("path")
    k.add_argument("--force", action="store_true")
    k.set_defaults(fn=cmd_keygen)
    e = sub.add_parser("enroll", help="enroll the device key (while healthy)")
    e.add_argument("--token", required=True, help="the fleet enrollment token")
    e.set_defaults(fn=cmd_enroll)
    sub.add_parser("run", help="run the recovery loop").set_defaults(fn=cmd_run)
    h = sub.add_parser("health", help="report a healthy boot")
    h.add_argument("--boot-id")
    h.add_argument("--kernel")
    h.set_defaults(fn=cmd_health)
    sub.add_parser("inspect", help="print the diagnostics without sending").set_defaults(fn=cmd_inspect)
    u = sub.add_parser("undo", help="put back what a directive changed")
    u.add_argument("directive_id")
    u.set_defaults(fn=cmd_undo)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return args.fn(args)
    except (SettingsError, BootEnvError, RemediationError, ProtocolError, FileNotFoundError) as exc:
        print(f"recovery-agent: {exc}", file=sys.stderr)
        return int(Outcome.ERROR)


if __name__ == "__main__":
    sys.exit(main())
