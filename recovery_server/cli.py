"""``recovery-server``: set up a data directory, add users offline, and serve.

The data directory holds ``server.key`` (the directive signing key, 0600), ``server.key.pub``
(pin this in every recovery environment) and ``recovery.db`` (SQLite), unless ``--database``
names a PostgreSQL database that several server processes share.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from aiohttp import web

from recovery_agent.protocol.keys import KeyFileError, SigningKey

from . import audit
from .access import ROLES, console
from .app import make_app, runner
from .device_api import MAX_POLL_S
from .diskkeys import ESCROW_KEY, EscrowKeyFile, ReleasePolicy
from .errors import ServerError
from .limits import RateLimit
from .listener import ACCEPT_BACKLOG, LISTEN_QUEUE, ConnectionLimits, fit_open_files
from .portfile import write_port_file
from .secretfile import SecretFile
from .service import RecoveryService, ServiceSettings
from .store import Store, StoreUnreachable

EXIT_CODES = """exit codes:
  0  done
  1  audit-verify: the audit log's hash chain is broken
  2  refused or invalid input: usage, a data directory, server key or database that cannot
     be used, a refused user name or role
  3  the database server (PostgreSQL) could not be reached"""

DEFAULT_DATA = os.environ.get("RECOVERY_DATA", "recovery-data")
_RETENTION = "90"  # days: ServiceSettings.report_retention's default


def _store(args: argparse.Namespace) -> Store:
    return Store(args.database or Path(args.data) / "recovery.db")


def _existing_store(args: argparse.Namespace) -> Store:
    """The database an offline check reads: opened only if it is there (a mistyped --data or
    --database must not leave a new, empty database that verifies)."""
    location = str(args.database or Path(args.data) / "recovery.db")
    if not location.startswith(("postgresql://", "postgres://")):
        path = Path(location.removeprefix("sqlite:///"))
        if not path.is_file():
            raise DataDirError(
                f"no database at {path}: point --data at the server's data directory "
                "(or --database at its database)"
            )
    return Store(location)


class DataDirError(ServerError):
    """Raised when the data directory cannot be used: no server key yet, or a server key that
    cannot be read or is not an Ed25519 private key."""


def _server_key(data: Path) -> SigningKey:
    key_path = data / "server.key"
    if not key_path.exists():
        raise DataDirError(f"no server key in {data}: run `recovery-server --data {data} init` first")
    try:
        return SigningKey.load(key_path)
    except KeyFileError:
        raise DataDirError(
            f"{key_path} cannot be used as the server key: it is unreadable by this user, damaged, "
            "or not an Ed25519 private key. Restore it from a backup; or move it away, run "
            f"`recovery-server --data {data} init` for a new key and pin the new server.key.pub "
            "in every recovery environment"
        ) from None


def open_service(args: argparse.Namespace, settings: ServiceSettings | None = None) -> RecoveryService:
    key = _server_key(Path(args.data))  # first: a wrong --data must not leave a new database
    escrow_path = Path(args.data) / ESCROW_KEY
    # A data directory made before encrypted disks has none: the server then keeps no disk keys.
    escrow = EscrowKeyFile.load(escrow_path) if escrow_path.exists() else None
    return RecoveryService(
        store=_store(args), server_key=key, settings=settings or ServiceSettings(), escrow=escrow
    )


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not 0 < value < 1e9:
            raise argparse.ArgumentTypeError(f"{text} must be above 0")
        return value

    return parse


def _days(text: str) -> timedelta | None:
    """A retention period in days (a number); 0 keeps everything."""
    try:
        days = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if not 0 <= days <= 36500:
        raise argparse.ArgumentTypeError("give 0 (keep everything) to 36500 days")
    return timedelta(days=days) if days else None


def cmd_init(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        # The token's file first: a path that cannot be used is refused before anything is made.
        secret = stack.enter_context(SecretFile(args.token_file)) if args.token_file else None
        data = Path(args.data)
        data.mkdir(parents=True, exist_ok=True)
        os.chmod(data, 0o700)
        key_path = data / "server.key"
        if key_path.exists():
            key = _server_key(data)
            print(f"server key exists in {data}; keeping it", file=sys.stderr)
        else:
            key = SigningKey.generate()
            key.save(key_path)
        # The escrow key (encrypted disks: diskkeys.py): a file of its own, never in the database.
        escrow_path = data / ESCROW_KEY
        if escrow_path.exists():
            EscrowKeyFile.load(escrow_path)
        else:
            EscrowKeyFile.generate().save(escrow_path)
        svc = RecoveryService(store=_store(args), server_key=key)
        print(f"server key id: {key.key_id}")
        print(f"pin this public key in recovery environments: {key_path}.pub")
        if svc.has_admin():
            if secret is not None:
                print(f"an admin exists already: no token written to {args.token_file}", file=sys.stderr)
            return 0
        new = svc.create_user(console("setup"), args.admin, "admin")
        _emit_token(new.token, secret, f"admin user {args.admin!r}")
    return 0


def _emit_token(token: str, secret: SecretFile | None, what: str) -> None:
    """A new person's token: into its new 0600 file (secretfile.py), or shown once."""
    if secret is not None:
        secret.write(token + "\n")
        print(f"token for {what} written to {secret.path}")
    else:
        print(f"token for {what} (shown once): {token}")


def cmd_user_add(args: argparse.Namespace) -> int:
    svc = open_service(args)
    with contextlib.ExitStack() as stack:
        secret = stack.enter_context(SecretFile(args.token_file)) if args.token_file else None
        new = svc.create_user(console("recovery-server"), args.name, args.role)
        _emit_token(new.token, secret, f"user {args.name!r} ({args.role})")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Offline: read the database directly, not through a server that might lie."""
    report = audit.verify_chain(_existing_store(args), args.expect_head)
    print(audit.describe(report))
    return 0 if report.ok else 1


def cmd_prune(args: argparse.Namespace) -> int:
    """Offline, on the database: delete what retention allows now (retention.py)."""
    if args.keep_days is None:
        print(
            "recovery-server: --keep-days 0 would keep everything: give the days to keep (e.g. 90)",
            file=sys.stderr,
        )
        return 2
    svc = open_service(args)
    pruned = svc.prune(console("recovery-server"), args.keep_days, dry_run=args.dry_run)
    print(pruned.describe(dry_run=args.dry_run))
    return 0


# Allocations between collections of the youngest generation (Python's default: 700).
GC_YOUNG_THRESHOLD = 50_000


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rate = RateLimit(burst=args.device_burst, per_minute=args.device_rate)
    svc = open_service(
        args,
        ServiceSettings(
            report_retention=args.retention_days,
            device_rate=rate,
            key_release=ReleasePolicy(mode=args.key_release),
        ),
    )
    limits = fit_open_files(
        ConnectionLimits(
            max_connections=args.max_connections,
            header_timeout_s=args.header_timeout,
            body_timeout_s=args.body_timeout,
            keepalive_timeout_s=args.keepalive_timeout,
        )
    )
    app = make_app(svc, limits=limits, metrics_access=args.metrics, max_poll_s=args.max_poll)

    async def run() -> None:
        served = runner(app, access_log=None if args.quiet else logging.getLogger("aiohttp.access"))
        await served.setup()
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.create_server((args.host, args.port), family=family, backlog=LISTEN_QUEUE)
        site = web.SockSite(served, sock, backlog=ACCEPT_BACKLOG)
        await site.start()
        sock.listen(LISTEN_QUEUE)  # asyncio listened with its per-turn burst: queue this many
        port = served.addresses[0][1]  # the real port when --port 0
        # What start-up built lives as long as the process: out of the collector's sight. A
        # report allocates some thousand objects (its JSON, its model): with the default
        # threshold the youngest generation was collected every few reports, and the older
        # ones often enough to stall every request in flight (docs/scale.md).
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 100)
        print(f"recovery-server listening on http://{args.host}:{port}", flush=True)
        if args.port_file:
            write_port_file(Path(args.port_file), port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await served.cleanup()
        svc.store.close()

    asyncio.run(run())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="recovery-server",
        description=__doc__.splitlines()[0],
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", default=DEFAULT_DATA, help="data directory (env RECOVERY_DATA)")
    p.add_argument(
        "--database",
        default=os.environ.get("RECOVERY_DATABASE"),
        help="postgresql://... to share one database between server processes "
        "(env RECOVERY_DATABASE; default: SQLite in the data directory)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("init", help="create the server key, the database and the first admin")
    i.add_argument("--admin", default="admin", help="name of the first admin user")
    i.add_argument(
        "--token-file",
        help="write the admin token into this new file (0600; an existing file or symlink is "
        "refused) instead of printing it",
    )
    i.set_defaults(fn=cmd_init)
    u = sub.add_parser("user-add", help="add a user directly in the database (offline)")
    u.add_argument("name")
    u.add_argument("--role", required=True, choices=ROLES)
    u.add_argument(
        "--token-file",
        help="write the token into this new file (0600; an existing file or symlink is refused)",
    )
    u.set_defaults(fn=cmd_user_add)
    av = sub.add_parser("audit-verify", help="check the audit log's hash chain in the database")
    av.add_argument("--expect-head", help="a head (SEQ:HASH) recorded earlier, elsewhere")
    av.set_defaults(fn=cmd_audit_verify)
    pr = sub.add_parser(
        "prune",
        help="delete superseded reports, old health reports and expired challenges (audited)",
        description="Delete, older than --keep-days: reports a later report of the same device and "
        "incident superseded (each device's latest report per incident, and every report a "
        "directive answered, are kept) and health reports that confirm no directive; and challenge "
        "nonces that expired. Incidents, directives, results and the audit log are never deleted.",
    )
    pr.add_argument(
        "--keep-days", type=_days, default=_RETENTION, metavar="DAYS", help="default: %(default)s"
    )
    pr.add_argument("--dry-run", action="store_true", help="only count what would be deleted")
    pr.set_defaults(fn=cmd_prune)
    s = sub.add_parser("serve", help="serve the device and admin APIs")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    s.add_argument("--port-file", help="write the port here once listening")
    s.add_argument("--quiet", action="store_true", help="no access log")
    s.add_argument(
        "--metrics",
        choices=("token", "public", "off"),
        default="token",
        help="who may read /metrics: a person with a token (any role; the default), anyone, or no one",
    )
    s.add_argument(
        "--max-poll",
        type=_positive(float),
        default=MAX_POLL_S,
        metavar="SECONDS",
        help="the longest a device's long poll waits (default: %(default)g, the agent's own); behind a "
        "proxy, keep it under the proxy's read timeout (docs/reverse-proxy.md)",
    )
    defaults = ConnectionLimits()
    s.add_argument(
        "--max-connections",
        type=_positive(int),
        default=defaults.max_connections,
        help="open connections at most; more are answered 503 (default: %(default)s; keep it far "
        "above the devices that may wait for a directive at once)",
    )
    s.add_argument(
        "--header-timeout",
        type=_positive(float),
        default=defaults.header_timeout_s,
        metavar="SECONDS",
        help="a request's head must arrive within this (default: %(default)s)",
    )
    s.add_argument(
        "--body-timeout",
        type=_positive(float),
        default=defaults.body_timeout_s,
        metavar="SECONDS",
        help="a request's body must arrive within this (default: %(default)s)",
    )
    s.add_argument(
        "--keepalive-timeout",
        type=_positive(float),
        default=defaults.keepalive_timeout_s,
        metavar="SECONDS",
        help="an idle connection is closed after this (default: %(default)s)",
    )
    rate = RateLimit()
    s.add_argument(
        "--device-burst",
        type=_positive(int),
        default=rate.burst,
        metavar="N",
        help="messages of one kind (diagnostics, results, health) one device may send at once "
        "(default: %(default)s)",
    )
    s.add_argument(
        "--device-rate",
        type=_positive(float),
        default=rate.per_minute,
        metavar="PER_MINUTE",
        help="then this many a minute; more are answered 429 with Retry-After (default: %(default)s)",
    )
    s.add_argument(
        "--retention-days",
        type=_days,
        default=_RETENTION,
        metavar="DAYS",
        help="prune superseded reports older than this every hour, as `prune` does (0: never; "
        "default: %(default)s)",
    )
    s.add_argument(
        "--key-release",
        choices=["on", "off"],
        default="on",
        help="release escrowed disk keys to devices in recovery (automatically to a device whose key "
        "is sealed in a TPM, else once a person approved): on, or off to refuse every request "
        "(default: %(default)s; docs/recovery-loop.md)",
    )
    s.set_defaults(fn=cmd_serve)
    args = p.parse_args(argv)
    try:
        return int(args.fn(args))
    except StoreUnreachable as exc:
        print(f"recovery-server: {exc}", file=sys.stderr)
        return 3
    except (ServerError, OSError) as exc:  # OSError: a data directory or port this user cannot use
        print(f"recovery-server: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
