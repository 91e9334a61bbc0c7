"""``recovery-agent``: the device side.

keygen PATH                       make a device key (PATH, 0600) and PATH.pub
enroll --token T                  enroll this device's key with the server (while healthy)
run                               the recovery loop (in the recovery environment); exit code = outcome
health                            the OS's health check passed: reset counters, report a good boot
escrow --device DEV --unlock-key-file F
                                  encrypted disk: add QMR's recovery key in its own LUKS keyslot
                                  and escrow it with the server (the key is never written)
test-mode                         arm a recovery test: the next boot goes to the recovery environment,
                                  runs the loop with a test directive and boots back (--status, --cancel)
inspect                           print the diagnostics the agent would send, without sending them
undo DIRECTIVE_ID                 put back what a directive changed
quarantine list                   the files remediations took off this machine, directive by directive
quarantine purge DIRECTIVE_ID     delete a directive's quarantine once a healthy boot confirmed it
                                  (--force: without that confirmation)
install, uninstall, recovery-env, health-check, mark-good
                                  set a Debian machine up (recovery_agent.install)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import secrets
import socket
import sys
import traceback
import uuid
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from . import __version__, diskkey, luks, osdisk, state, testmode
from .agent import Outcome, RecoveryAgent, Timeline, report_health
from .bootenv import BootEnvError
from .errors import AgentError
from .install.cli import REFUSALS as INSTALL_REFUSALS
from .install.cli import add_commands as add_install_commands
from .journal import JournalError
from .layout import ESCROW_SENT
from .protocol import sealing
from .protocol.client import DeviceClient, ServerRefused, ServerUnreachable
from .protocol.envelope import seal_bytes
from .protocol.errors import ProtocolError
from .protocol.keys import KeyFileError, SigningKey, public_b64
from .protocol.wire import Enrollment, utcnow
from .remediate import list_quarantine, undo
from .settings import AgentSettings, SettingsError

DEFAULT_CONFIG = "/etc/recovery/agent.json"

# The exit-code convention of the project's command lines, for every command but `run`.
EXIT_OK = 0
EXIT_FAILED = 1  # the agent itself failed
EXIT_REFUSED = 2  # refused or invalid input: usage, settings, a key file, a request refused
EXIT_UNREACHABLE = 3  # the server could not be reached


class UsageError(AgentError):
    """Raised when a command's arguments are not valid (beyond what argparse checks)."""


# Invalid input rather than a failure of the agent: the message says what to fix.
_REFUSALS = (
    UsageError,
    SettingsError,
    KeyFileError,
    BootEnvError,
    JournalError,
    state.NotConfirmed,
    ServerRefused,
    *INSTALL_REFUSALS,
)


def _run_exit_codes() -> str:
    outcomes = "\n".join(f"  {int(o):>2}  {o.name:<19} {o.meaning}" for o in sorted(Outcome))
    return (
        "exit codes of `run` (the recovery environment's init acts on them: 12 keeps the\n"
        f"machine in recovery, any other code reboots it):\n{outcomes}\n"
    )


def _exit_codes() -> str:
    return (
        f"{_run_exit_codes()}\n"
        "exit codes of the other commands:\n"
        f"  {EXIT_OK}  success\n"
        f"  {EXIT_FAILED}  the agent itself failed\n"
        f"  {EXIT_REFUSED}  refused or invalid input: usage, the settings or key file, a directive that\n"
        "     does not apply (unknown, or not confirmed for purge), a request the server refused\n"
        f"  {EXIT_UNREACHABLE}  the server could not be reached\n"
    )


def _print(line: str) -> None:
    print(line, flush=True)


def cmd_keygen(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.exists() and not args.force:
        print(f"recovery-agent: {path} exists; keeping it (use --force to replace)", file=sys.stderr)
        return EXIT_OK
    key = SigningKey.generate()
    key.save(path)
    print(f"device key {key.key_id} written to {path} and {path}.pub")
    return EXIT_OK


def cmd_enroll(args: argparse.Namespace) -> int:
    s = AgentSettings.load(args.config)
    if not s.device_key.exists():
        SigningKey.generate().save(s.device_key)
    key = SigningKey.load(s.device_key)
    try:
        msg = Enrollment(
            device_id=s.device_id,
            public_key=public_b64(key.public),
            enrollment_token=args.token,
            hostname=socket.gethostname()[:255],
            created_at=utcnow(),
        )
    except ValidationError as exc:
        raise UsageError(
            f"--token is not an enrollment token ({exc.errors()[0]['msg']}): copy the whole token "
            f"`recovery-admin enrollment-token` printed"
        ) from None

    async def go() -> dict[str, Any]:
        async with DeviceClient(s.server_url) as client:
            return await client.enroll(seal_bytes(msg, key))

    answer = asyncio.run(go())
    print(f"device {answer['device_id']}: {answer['status']} (key {answer['key_id'][:16]}…)")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    s = AgentSettings.load(args.config)
    if bool(args.os_volume) != bool(args.boot_mount):
        raise UsageError(
            "--os-volume and --boot-mount go together (an encrypted OS root, and where /boot is mounted)"
        )
    encrypted = osdisk.EncryptedOs(Path(args.os_volume), Path(args.boot_mount)) if args.os_volume else None
    agent = RecoveryAgent(s, timeline=Timeline(sink=_print), encrypted_os=encrypted)
    outcome = asyncio.run(agent.run())
    _print(f"recovery-agent: outcome {outcome.name} (exit {int(outcome)})")
    return int(outcome)


def cmd_health(args: argparse.Namespace) -> int:
    s = AgentSettings.load(args.config)
    boot_id = args.boot_id or _boot_id()
    answer = asyncio.run(report_health(s, boot_id, args.kernel or ""))
    print(f"health reported for boot {boot_id}: {answer['status']}")
    if answer.get("recovery_test") == "armed":
        # (a line the lab's OS and a person's script can act on: reboot now, or later)
        print("QMR-RECOVERY-TEST armed by the server: the next boot runs a recovery test")
    return EXIT_OK


def cmd_escrow(args: argparse.Namespace) -> int:
    """A fresh recovery key in its own keyslot, escrowed; the slot is removed again if the
    server does not take the key (nothing half-done), and the key is wiped either way. With
    ``--escrow-key`` (offline, as at install) the sealed escrow waits on the OS disk for the
    first health report to deliver it. ``--rotate``: the new key goes in a free keyslot and,
    once the server holds it, the previous escrow's keyslot is removed."""
    s = AgentSettings.load(args.config)
    device, unlock, root = Path(args.device), Path(args.unlock_key_file), Path(args.root)
    slot: int = args.slot
    device_key = SigningKey.load(s.device_key)
    old_slot = None
    if args.rotate:
        if args.escrow_key:
            raise UsageError(
                "--rotate needs the server now (the old keyslot goes only once the server holds the "
                "new key): drop --escrow-key"
            )
        old_slot = diskkey.escrowed_slot(root, device_key)
        if old_slot is None:
            raise AgentError(f"nothing to rotate: no escrow recorded under {root / ESCROW_SENT}")
        free = sorted(set(range(32)) - luks.used_slots(device))
        if not free:
            raise AgentError(f"{device} has no free keyslot for the new key")
        slot = free[-1]
    offline = None
    if args.escrow_key:
        try:
            offline = json.loads(Path(args.escrow_key).read_text())
        except (OSError, ValueError) as exc:
            raise AgentError(
                f"--escrow-key {args.escrow_key}: {exc} (the server's signed escrow key: GET /v1/escrow-key)"
            ) from None
    key = bytearray(secrets.token_bytes(32))
    try:
        luks.add_keyslot(device, unlock, key, slot)
        try:
            if not luks.check_key(device, key, slot):
                raise luks.LuksError(f"the new key does not open keyslot {slot} of {device}")
            if offline is not None:
                raw = diskkey.seal_escrow(
                    device_key,
                    s.server_public_key,
                    s.device_id,
                    key,
                    slot,
                    offline,
                    tpm_sealed=args.tpm_sealed,
                )
                pending = diskkey.save_pending(root, raw)
            else:

                async def go() -> dict[str, Any]:
                    async with DeviceClient(s.server_url) as client:
                        return await diskkey.escrow(
                            client,
                            device_key,
                            s.server_public_key,
                            s.device_id,
                            key,
                            slot,
                            tpm_sealed=args.tpm_sealed,
                            record_in=root,
                        )

                answer = asyncio.run(go())
        except BaseException:
            luks.remove_keyslot(device, unlock, slot)
            raise
    finally:
        sealing.wipe(key)
    if offline is not None:
        print(
            f"keyslot {slot} of {device} holds QMR's recovery key, sealed to the server's escrow key "
            f"in {pending}: the next health report delivers it"
        )
        return EXIT_OK
    replaced = f" (replaces {', '.join(answer['replaced'])})" if answer.get("replaced") else ""
    print(f"keyslot {slot} of {device} holds QMR's recovery key, escrowed as {answer['key_id']}{replaced}")
    if old_slot is not None and old_slot != slot:
        luks.remove_keyslot(device, unlock, old_slot)
        print(f"rotated: keyslot {old_slot} (the previous recovery key) removed")
    return EXIT_OK


def cmd_test_mode(args: argparse.Namespace) -> int:
    s = AgentSettings.load(args.config)
    if args.cancel:
        if testmode.disarm(s.grubenv):
            print("recovery test cancelled: the next boot is the OS's")
        else:
            print("no recovery test was armed")
        return EXIT_OK
    by = testmode.armed(s.grubenv)
    if args.status:
        print(
            f"a recovery test is armed (by {by}): the next boot runs it"
            if by
            else "no recovery test is armed"
        )
        return EXIT_OK
    if by is None:
        testmode.arm(s.grubenv, testmode.LOCAL)
    print(
        "recovery test armed: the next boot goes to the recovery environment, runs the recovery "
        "loop against the server with a test directive that changes nothing on the OS, and "
        "boots back. Reboot when it suits (recovery-agent test-mode --cancel to call it off)."
    )
    return EXIT_OK


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return str(uuid.uuid4())


def cmd_inspect(args: argparse.Namespace) -> int:
    s = AgentSettings.load(args.config)
    agent = RecoveryAgent(s)
    findings = agent.collect(agent.read_boot_count(count_visit=False))
    print(json.dumps(findings.as_json(), indent=2))
    return EXIT_OK


def cmd_undo(args: argparse.Namespace) -> int:
    s = AgentSettings.load(args.config)
    for line in undo(s.os_root, args.directive_id):
        print(line)
    return EXIT_OK


def cmd_quarantine_list(args: argparse.Namespace) -> int:
    s = AgentSettings.load(args.config)
    files = list_quarantine(s.os_root)
    if not files:
        print(f"no quarantined files on {s.os_root}")
        return EXIT_OK
    confirmed = state.confirmed_directive(s.os_root)
    for f in files:
        e = f.entry
        notes = [f"held as {e.stored_name}" if f.present else f"MISSING {e.stored_name}"]
        if e.restored_at is not None:
            notes.append(f"restored {e.restored_at.isoformat()}")
        if f.directive_id == confirmed:
            notes.append("confirmed by a healthy boot")
        print(
            f"{f.directive_id}  {f.journal_state:<12} {e.role:<11} {e.original_path}  "
            f"sha256 {e.sha256[:16]}…  {e.size} bytes  {e.quarantined_at.isoformat()}  ({'; '.join(notes)})"
        )
    return EXIT_OK


def cmd_quarantine_purge(args: argparse.Namespace) -> int:
    s = AgentSettings.load(args.config)
    state.purge_quarantine(s.os_root, args.directive_id, force=args.force)
    print(f"purged the quarantine of directive {args.directive_id}; its journal is kept (state purged)")
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recovery-agent",
        description="Quick Machine Recovery agent",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"{__doc__}\n{_exit_codes()}",
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
    r = sub.add_parser(
        "run",
        help="run the recovery loop",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_run_exit_codes(),
    )
    r.add_argument(
        "--os-volume",
        help="the OS root is this LUKS2 volume, still locked: ask the server for its key, open and mount it",
    )
    r.add_argument("--boot-mount", help="with --os-volume: where /boot is mounted (it stays unencrypted)")
    r.set_defaults(fn=cmd_run)
    h = sub.add_parser("health", help="report a healthy boot")
    h.add_argument("--boot-id")
    h.add_argument("--kernel")
    h.set_defaults(fn=cmd_health)
    es = sub.add_parser(
        "escrow", help="encrypted disk: add QMR's recovery key in its own LUKS keyslot and escrow it"
    )
    es.add_argument("--device", required=True, help="the LUKS2 volume (the OS root's partition)")
    es.add_argument(
        "--unlock-key-file", required=True, help="a key that opens it already (the machine's normal-boot key)"
    )
    es.add_argument("--slot", type=int, default=7, help="the keyslot for QMR's key (default %(default)s)")
    es.add_argument(
        "--tpm-sealed",
        action="store_true",
        help="this device's key is sealed in a TPM: the server may release the disk key with no person",
    )
    es.add_argument(
        "--escrow-key",
        help="offline: the server's signed escrow key (JSON, as GET /v1/escrow-key answers); the sealed "
        "escrow is kept on the OS disk until a health report delivers it",
    )
    es.add_argument(
        "--rotate",
        action="store_true",
        help="a new recovery key in a free keyslot; once the server holds it, the previous one's slot "
        "is removed",
    )
    es.add_argument("--root", default="/", help="the OS root the escrow's record is kept on (default /)")
    es.set_defaults(fn=cmd_escrow)
    t = sub.add_parser("test-mode", help="arm a recovery test for the next boot (like reagentc /boottore)")
    t.add_argument("--status", action="store_true", help="say whether a test is armed")
    t.add_argument("--cancel", action="store_true", help="disarm it: the next boot is the OS's")
    t.set_defaults(fn=cmd_test_mode)
    sub.add_parser("inspect", help="print the diagnostics without sending").set_defaults(fn=cmd_inspect)
    u = sub.add_parser("undo", help="put back what a directive changed")
    u.add_argument("directive_id")
    u.set_defaults(fn=cmd_undo)
    q = sub.add_parser("quarantine", help="list or purge the files remediations took off this machine")
    qsub = q.add_subparsers(dest="quarantine_cmd", required=True)
    qsub.add_parser("list", help="every quarantined file, directive by directive").set_defaults(
        fn=cmd_quarantine_list
    )
    qp = qsub.add_parser(
        "purge",
        help="delete a directive's quarantine (only once a healthy boot confirmed the directive)",
    )
    qp.add_argument("directive_id")
    qp.add_argument(
        "--force", action="store_true", help="purge even though no healthy boot confirmed the directive"
    )
    qp.set_defaults(fn=cmd_quarantine_purge)
    add_install_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        code: int = args.fn(args)
        return code
    except Exception as exc:
        if args.fn is cmd_run:
            # The recovery environment's init knows only the outcomes: any failure is ERROR
            # (the loop itself reports its own failures; this is before or after it).
            if args.verbose or not isinstance(exc, (AgentError, ProtocolError, OSError)):
                traceback.print_exc()
            print(f"recovery-agent: {exc}", file=sys.stderr)
            return int(Outcome.ERROR)
        if not isinstance(exc, (AgentError, ProtocolError, OSError)):
            raise
        if args.verbose:
            traceback.print_exc()
        print(f"recovery-agent: {exc}", file=sys.stderr)
        if isinstance(exc, ServerUnreachable):
            return EXIT_UNREACHABLE
        return EXIT_REFUSED if isinstance(exc, _REFUSALS) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
