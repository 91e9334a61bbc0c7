"""``recovery-admin``: the fleet admin's command line, over the server's admin API.

The server URL comes from --server or RECOVERY_SERVER, the person's token from --token,
--token-file or RECOVERY_TOKEN. Every command prints a readable table; --json prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from recovery_agent.protocol.admin import (
    INCIDENT_REPORTS_PAGE,
    INCIDENT_REPORTS_PAGE_MAX,
    AdminClient,
    Correlation,
    Role,
    RolloutPlan,
    RuleRequest,
)
from recovery_agent.protocol.client import RetryPolicy, ServerRefused, ServerUnreachable
from recovery_agent.protocol.envelope import actions_digest, rule_digest, seal
from recovery_agent.protocol.errors import ProtocolError
from recovery_agent.protocol.keys import SigningKey, atomic_write, public_b64
from recovery_agent.protocol.wire import (
    KnownBadRule,
    PathRuleError,
    RemediationApproval,
    RuleApproval,
    check_relative_path,
    utcnow,
)

from .audit import describe
from .errors import ServerError
from .secretfile import SecretFile

EXIT_CODES = """exit codes:
  0  done
  1  audit verify: the audit log's hash chain is broken
  2  refused or invalid input: usage, a bad action, token or key file, a request the
     server refused
  3  the server could not be reached"""


class CommandError(ServerError):
    """Raised when a command's own input cannot be used (an action spec, a token, actions or
    key file); nothing was sent."""


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[str(r.get(c, "") if r.get(c) is not None else "") for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _actions_from_args(args: argparse.Namespace) -> list[dict[str, Any]]:
    actions: list[dict[str, Any]] = []
    try:
        for spec in args.quarantine or []:
            path, _, sha = spec.rpartition(":")
            actions.append({"type": "quarantine_file", "path": check_relative_path(path), "sha256": sha})
        for spec in args.restore or []:
            parts = spec.split(":")
            if len(parts) != 3:
                raise CommandError(f"--restore takes PATH:SOURCE:SHA256, not {spec!r}")
            actions.append(
                {
                    "type": "restore_file",
                    "path": check_relative_path(parts[0]),
                    "source": check_relative_path(parts[1]),
                    "sha256": parts[2],
                }
            )
    except PathRuleError as exc:
        raise CommandError(str(exc)) from None
    for name in args.disable_driver or []:
        actions.append({"type": "disable_driver", "name": name})
    if args.actions_file:
        try:
            more = json.loads(Path(args.actions_file).read_text())
        except (OSError, ValueError) as exc:
            raise CommandError(f"--actions-file {args.actions_file}: {exc}") from None
        if not isinstance(more, list):
            raise CommandError(f"--actions-file {args.actions_file}: expected a JSON list of actions")
        actions.extend(more)
    return actions


async def _signed_approval(c: AdminClient, remediation_id: str, key_path: str) -> dict[str, Any]:
    """Sign what this person approves, computed here from the actions shown, not taken from
    the server: a compromised server cannot get a signature on other actions."""
    key = SigningKey.load(Path(key_path))
    me = await c.whoami()
    rem = next((r for r in await c.remediations() if r.remediation_id == remediation_id), None)
    if rem is None:
        raise CommandError(f"no remediation {remediation_id}: list them with recovery-admin remediation list")
    print(f"signing approval of {rem.remediation_id} ({rem.title}):", file=sys.stderr)
    for action in rem.actions:
        print(f"  {json.dumps(action.model_dump(mode='json'), sort_keys=True)}", file=sys.stderr)
    approval = RemediationApproval(
        remediation_id=rem.remediation_id,
        actions_sha256=actions_digest(rem.actions),
        approver=me.name,
        approved_at=utcnow(),
    )
    return seal(approval, key)


@dataclass
class Output:
    """What a command prints: ``data`` as JSON (--json, or when there is no table), else
    ``rows`` as a table of ``cols`` under an optional ``heading``; and its exit code."""

    data: Any
    rows: list[dict[str, Any]] | None = None
    cols: list[str] = field(default_factory=list)
    heading: str | None = None
    text: str | None = None  # a readable form other than a table
    code: int = 0


def _plain(data: Any) -> Any:
    if isinstance(data, BaseModel):
        return data.model_dump(mode="json")
    if isinstance(data, list):
        return [_plain(item) for item in data]
    return data


def _rows(items: Sequence[BaseModel]) -> list[dict[str, Any]]:
    return [item.model_dump(mode="json") for item in items]


async def _incidents(c: AdminClient, args: argparse.Namespace) -> Output:
    if args.why:
        if not args.incident_id:
            raise CommandError("--why needs an incident: recovery-admin incidents INC-... --why")
        return _why(await c.correlation(args.incident_id))
    if args.incident_id:
        detail = await c.incident(args.incident_id, args.limit, args.after)
        if detail.next_after:
            print(
                f"recovery-admin: reports {len(detail.reports)} of {detail.reports_total}; the next "
                f"ones: recovery-admin incidents {args.incident_id} --after {detail.next_after}",
                file=sys.stderr,
            )
        return Output(detail)
    incidents = await c.incidents()
    rows = [dict(r, devices=r["devices_total"]) for r in _rows(incidents)]
    return Output(
        incidents, rows, ["incident_id", "kind", "report_count", "devices", "guilty_module", "title"]
    )


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    sign, s = ("", seconds) if seconds >= 0 else ("after ", -seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{sign}{s / size:.1f}{unit}"
    return f"{sign}{s:.0f}s"


def _why(corr: Correlation) -> Output:
    """The correlation as a table: the most telling file first."""
    rows = [
        {
            "rank": i,
            "file": c.path + (f" ({c.version})" if c.version else ""),
            "sha256": c.sha256[:12],
            "incident": f"{c.crashing}/{corr.crashing_devices} ({c.crashing_share:.0%})",
            "healthy": f"{c.healthy}/{corr.healthy_devices} ({c.healthy_share:.0%})",
            "odds": f"{c.odds_ratio:.3g}",
            "p": f"{c.p_value:.2g}",
            "first seen before": _ago(c.onset_before_s),
        }
        for i, c in enumerate(corr.candidates, 1)
    ]
    heading = (
        f"{corr.incident_id}: files of its {corr.crashing_devices} devices against "
        f"{corr.healthy_devices} healthy devices (one-sided Fisher exact test)"
    )
    for note in corr.notes:
        heading += f"\nnote: {note}"
    cols = ["rank", "file", "sha256", "incident", "healthy", "odds", "p", "first seen before"]
    return Output(corr, rows, cols, heading=heading)


async def _remediation(c: AdminClient, args: argparse.Namespace) -> Output:
    if args.rcmd == "list":
        rems = await c.remediations()
        rows = [dict(r, approvals=f"{len(r['approvals'])}/{r['required_approvals']}") for r in _rows(rems)]
        return Output(rems, rows, ["remediation_id", "status", "approvals", "author", "incident_id", "title"])
    if args.rcmd == "create":
        actions: list[Any] = _actions_from_args(args)
        title = args.title
        if args.suggested:
            s = await c.suggestion(args.incident)
            if not s.actions:
                raise CommandError("; ".join(s.why))
            actions = [a.model_dump(mode="json") for a in s.actions] + actions
            title = title or s.title
        if not actions:
            raise CommandError(
                "give at least one action (--quarantine, --restore, --disable-driver, "
                "--actions-file or --suggested)"
            )
        return Output(
            await c.create_remediation(title or "remediation", actions, args.incident, args.approvals)
        )
    if args.rcmd == "approve":
        signed = await _signed_approval(c, args.remediation_id, args.key) if args.key else None
        return Output(await c.approve(args.remediation_id, signed))
    return Output(await c.revoke(args.remediation_id))


def _plan_from_args(args: argparse.Namespace) -> RolloutPlan:
    """A rollout plan from the options ``_add_plan_options`` adds."""
    waves: list[dict[str, Any]] = []
    if args.canary:
        waves.append({"name": "canary", "devices": args.canary.split(",")})
    for pct in args.percent or [10, 100]:
        waves.append({"name": f"{pct:g}%", "percent": pct})
    return RolloutPlan.model_validate(
        {
            "waves": waves,
            "min_devices": args.min_devices,
            "min_success_rate": args.min_success_rate,
            "soak_s": args.soak,
            "halt_failure_rate": args.halt_failure_rate,
            "halt_min_devices": args.halt_min_devices,
        }
    )


def _add_plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--canary", help="comma-separated device ids for the first wave")
    p.add_argument(
        "--percent",
        type=float,
        action="append",
        help="a percentage wave (repeat, growing, last 100); default 10 then 100",
    )
    p.add_argument("--min-devices", type=int, default=1, help="finished devices before promotion")
    p.add_argument("--min-success-rate", type=float, default=0.95)
    p.add_argument("--soak", type=float, default=0, help="seconds a wave runs before promotion")
    p.add_argument("--halt-failure-rate", type=float, default=0.2)
    p.add_argument("--halt-min-devices", type=int, default=1)


async def _rule(c: AdminClient, args: argparse.Namespace) -> Output:
    if args.rulecmd == "list":
        rules = await c.rules()
        rows = [
            dict(r, approvals=f"{len(r['approvals'])}/{r['required_approvals']}", uses=len(r["uses"]))
            for r in _rows(rules)
        ]
        return Output(
            rules, rows, ["rule_id", "status", "approvals", "uses", "path_pattern", "sha256", "title"]
        )
    if args.rulecmd == "create":
        path_pattern, sha256 = args.path_pattern, args.sha256
        if args.from_remediation:
            rem = next((r for r in await c.remediations() if r.remediation_id == args.from_remediation), None)
            quarantines = [a for a in rem.actions if a.type == "quarantine_file"] if rem else []
            if rem is None or len(quarantines) != 1:
                raise CommandError(
                    f"--from-remediation {args.from_remediation}: name a remediation that quarantines "
                    "one file"
                )
            path_pattern = path_pattern or quarantines[0].path
            sha256 = sha256 or quarantines[0].sha256
        if not path_pattern or not sha256:
            raise CommandError("give --path-pattern and --sha256, or --from-remediation REM")
        request = RuleRequest.model_validate(
            {
                "title": args.title,
                "path_pattern": path_pattern,
                "sha256": sha256,
                "required_approvals": args.approvals,
                "rollout": _plan_from_args(args) if args.staged else None,
            }
        )
        return Output(await c.create_rule(request))
    if args.rulecmd == "approve":
        signed = await _signed_rule_approval(c, args.rule_id, args.key) if args.key else None
        return Output(await c.approve_rule(args.rule_id, signed))
    return Output(await c.revoke_rule(args.rule_id))


async def _signed_rule_approval(c: AdminClient, rule_id: str, key_path: str) -> dict[str, Any]:
    """Sign the rule as shown here (its digest computed here, not taken from the server)."""
    key = SigningKey.load(Path(key_path))
    me = await c.whoami()
    rule = next((r for r in await c.rules() if r.rule_id == rule_id), None)
    if rule is None:
        raise CommandError(f"no known-bad rule {rule_id}: list them with recovery-admin rule list")
    wire = KnownBadRule(
        rule_id=rule.rule_id, title=rule.title, path_pattern=rule.path_pattern, sha256=rule.sha256
    )
    print(
        f"signing approval of known-bad rule {rule.rule_id} ({rule.title}): quarantine files matching "
        f"{rule.path_pattern} with sha256 {rule.sha256}, on every device that reports one, with no "
        "new approval",
        file=sys.stderr,
    )
    approval = RuleApproval(
        rule_id=rule.rule_id, rule_sha256=rule_digest(wire), approver=me.name, approved_at=utcnow()
    )
    return seal(approval, key)


async def _rollout(c: AdminClient, args: argparse.Namespace) -> Output:
    if args.rocmd == "create":
        return Output(await c.create_rollout(args.remediation_id, _plan_from_args(args)))
    if args.rocmd == "list":
        rollouts = await c.rollouts()
        rows = [
            dict(
                ro.model_dump(mode="json"),
                wave=ro.plan.waves[ro.current_wave].name,
                served=sum(w.served for w in ro.waves),
                failed=sum(w.failed for w in ro.waves),
            )
            for ro in rollouts
        ]
        return Output(
            rollouts, rows, ["rollout_id", "remediation_id", "state", "wave", "served", "failed", "reason"]
        )
    if args.rocmd == "show":
        ro = await c.rollout(args.rollout_id)
        return Output(
            ro,
            _rows(ro.waves),
            ["name", "reached", "served", "counted", "succeeded", "failed", "pending"],
            heading=f"{ro.rollout_id} for {ro.remediation_id}: {ro.state} ({ro.reason})",
        )
    return Output(await c.set_rollout_state(args.rollout_id, args.rocmd))


async def _key(c: AdminClient, args: argparse.Namespace) -> Output:
    path = Path(args.path)
    key = SigningKey.generate()
    with SecretFile(path) as f:  # a new file, 0600: never an existing file or a symlink
        f.write(key.private_pem())
    atomic_write(Path(f"{path}.pub"), (public_b64(key.public) + "\n").encode())
    registered = await c.register_key(public_b64(key.public))
    return Output(
        {
            **registered.model_dump(mode="json"),
            "public_key": public_b64(key.public),
            "pin_in_agent_settings": "approver_keys",
        }
    )


async def _audit(c: AdminClient, args: argparse.Namespace) -> Output:
    if args.cmd == "audit" and args.acmd == "verify":
        report = await c.verify_audit(args.expect_head)
        return Output(report, text=describe(report), code=0 if report.ok else 1)
    events = await c.events(args.after, args.device)
    return Output(events, _rows(events), ["seq", "at", "kind", "actor", "device_id", "subject", "detail"])


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(text: str) -> int:
    """``90s``, ``30m``, ``24h``, ``7d`` or plain seconds, as whole seconds."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    if not (number.isascii() and number.isdigit()) or len(number) > 9:
        raise CommandError(f"--expires {text!r}: give a duration such as 30m, 24h or 7d")
    return int(number) * _UNITS[unit]


async def _enrollment_token(c: AdminClient, args: argparse.Namespace) -> Output:
    if args.etcmd == "list":
        tokens = await c.enrollment_tokens()
        rows = [
            dict(t, uses=f"{t['used']}/{t['max_uses'] if t['max_uses'] is not None else 'any'}")
            for t in _rows(tokens)
        ]
        return Output(tokens, rows, ["token_id", "label", "state", "uses", "expires_at", "created_by"])
    if args.etcmd == "revoke":
        return Output(await c.revoke_enrollment_token(args.token_id))
    expires = duration_s(args.expires) if args.expires else None
    return Output(await c.create_enrollment_token(args.label, expires, args.uses))


async def _device(c: AdminClient, args: argparse.Namespace) -> Output:
    if args.dcmd == "list" and (getattr(args, "keys", False) or getattr(args, "device_id", None)):
        if not (args.keys and args.device_id):
            raise CommandError("recovery-admin devices DEVICE --keys: name the device, and --keys")
        args.dcmd = "keys"
    if args.dcmd == "revoke":
        return Output(await c.revoke_device(args.device_id))
    if args.dcmd == "rekey":
        return Output(await c.replace_device_key(args.device_id, args.public_key))
    if args.dcmd == "keys":
        if args.approve or args.refuse:
            view = await c.decide_key_release(args.approve or args.refuse, approve=bool(args.approve))
        elif args.revoke:
            view = await c.revoke_disk_keys(args.device_id)
        else:
            view = await c.disk_keys(args.device_id)
        return Output(
            view,
            [r.model_dump(mode="json") for r in view.releases],
            [
                "release_id",
                "state",
                "report_id",
                "requested_at",
                "decided_by",
                "released",
                "last_released_at",
            ],
            heading=f"{view.device_id}: release policy {view.policy}; keys: "
            + (
                ", ".join(
                    f"{k.key_id} slot {k.slot} {k.state}" + (" (TPM)" if k.tpm_sealed else "")
                    for k in view.keys
                )
                or "none escrowed"
            ),
        )
    if args.dcmd == "test":
        return Output(await c.request_recovery_test(args.device_id, cancel=args.cancel))
    devices = await c.devices()
    rows = [
        dict(
            d,
            state="revoked" if d["revoked_at"] else d["state"],
            recovery_test=_test_state(d),
        )
        for d in _rows(devices)
    ]
    return Output(
        devices,
        rows,
        [
            "device_id",
            "state",
            "recovery_attempts",
            "last_seen",
            "recovery_test",
            "enrolled_with",
            "hostname",
        ],
    )


def _test_state(device: dict[str, Any]) -> str:
    """A device's recovery test in a word: when it last passed, or never; and asked for."""
    passed = (
        f"passed {device['recovery_test_passed_at']}" if device["recovery_test_passed_at"] else "never passed"
    )
    return passed + (" (test requested)" if device["recovery_test_requested_at"] else "")


def _token_file(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise CommandError(f"cannot read the token file {path}: {exc.strerror}") from None


async def _run(args: argparse.Namespace) -> Output:
    token = args.token or _token_file(args.token_file) or os.environ.get("RECOVERY_TOKEN")
    retry = RetryPolicy(attempts=3, max_delay_s=10)
    async with AdminClient(args.server, token, retry=retry) as c:
        cmd = args.cmd
        if cmd == "whoami":
            return Output(await c.whoami())
        if cmd in ("devices", "device"):
            return await _device(c, args)
        if cmd == "incidents":
            return await _incidents(c, args)
        if cmd == "suggest":
            return Output(await c.suggestion(args.incident_id))
        if cmd == "remediation":
            return await _remediation(c, args)
        if cmd == "rule":
            return await _rule(c, args)
        if cmd == "rollout":
            return await _rollout(c, args)
        if cmd == "key":
            return await _key(c, args)
        if cmd == "user":
            return Output(await c.create_user(args.name, args.role))
        if cmd == "enrollment-token":
            return await _enrollment_token(c, args)
        if cmd in ("audit", "events"):
            return await _audit(c, args)
    raise CommandError(f"unknown command {cmd}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="recovery-admin",
        description=__doc__.splitlines()[0],
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--server", default=os.environ.get("RECOVERY_SERVER", "http://127.0.0.1:8080"))
    p.add_argument("--token", help="your admin token (or RECOVERY_TOKEN)")
    p.add_argument("--token-file", help="read your admin token from this file")
    p.add_argument("--json", action="store_true", help="print JSON (also accepted after the command)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("whoami")
    dv = sub.add_parser("devices", help="list devices and their state (with DEVICE --keys: its disk keys)")
    dv.add_argument("device_id", nargs="?", help="with --keys: the device")
    dv.add_argument(
        "--keys", action="store_true", help="the device's escrowed disk keys and every release (device keys)"
    )
    dv.set_defaults(dcmd="list", approve=None, refuse=None, revoke=False)
    d = sub.add_parser("device", help="list, test a device's recovery, revoke it, or give it a new key")
    dsub = d.add_subparsers(dest="dcmd", required=True)
    dsub.add_parser("list", help="every device, its state and the token that enrolled it")
    dsub.add_parser(
        "revoke", help="refuse the device's messages from now on; its outcomes stop counting"
    ).add_argument("device_id")
    dkeys = dsub.add_parser(
        "keys",
        help="the device's escrowed disk keys and their releases; approve or refuse a release, "
        "revoke its keys (approver)",
    )
    dkeys.add_argument("device_id")
    dkeys_do = dkeys.add_mutually_exclusive_group()
    dkeys_do.add_argument("--approve", metavar="REL", help="release the key the device asked for in recovery")
    dkeys_do.add_argument("--refuse", metavar="REL", help="refuse that release")
    dkeys_do.add_argument("--revoke", action="store_true", help="end its keys: none is released again")
    dt = dsub.add_parser(
        "test",
        help="ask the device to test its recovery path at its next boot: it visits the recovery "
        "environment, runs the loop with a test directive that changes nothing, and boots back (operator)",
    )
    dt.add_argument("device_id")
    dt.add_argument(
        "--cancel", action="store_true", help="take the request back (if the device has not armed it)"
    )
    dk = dsub.add_parser(
        "rekey",
        help="give a known device a new key (a reinstalled machine, or an id another took first); "
        "the old key stops working",
    )
    dk.add_argument("device_id")
    dk.add_argument(
        "--public-key", required=True, help="the machine's public key, as its refused enrollment printed it"
    )
    i = sub.add_parser("incidents", help="list incidents, or show one")
    i.add_argument("incident_id", nargs="?")
    i.add_argument(
        "--why",
        action="store_true",
        help="rank the files the incident's devices have against healthy devices (the likely culprit first)",
    )
    i.add_argument(
        "--limit",
        type=int,
        default=INCIDENT_REPORTS_PAGE,
        help=f"reports shown with the incident, oldest first (at most {INCIDENT_REPORTS_PAGE_MAX})",
    )
    i.add_argument("--after", help="show the reports after this one (as the last page said)")
    s = sub.add_parser("suggest", help="propose a fix for an incident from its reports")
    s.add_argument("incident_id")
    r = sub.add_parser("remediation", help="create, approve, revoke, list remediations")
    rs = r.add_subparsers(dest="rcmd", required=True)
    rs.add_parser("list")
    c = rs.add_parser("create")
    c.add_argument("--incident", required=True)
    c.add_argument("--title")
    c.add_argument("--quarantine", action="append", metavar="PATH:SHA256")
    c.add_argument("--restore", action="append", metavar="PATH:SOURCE:SHA256")
    c.add_argument("--disable-driver", action="append", metavar="MODULE")
    c.add_argument("--actions-file", help="a JSON list of actions")
    c.add_argument("--suggested", action="store_true", help="start from the server's suggestion")
    c.add_argument("--approvals", type=int, default=1, help="approvers needed (not the author)")
    for name in ("approve", "revoke"):
        a = rs.add_parser(name)
        a.add_argument("remediation_id")
        if name == "approve":
            a.add_argument(
                "--key",
                help="sign the approval with your own key (required once you "
                "registered one with `recovery-admin key create`)",
            )
    ro = sub.add_parser("rollout", help="staged rollout of a remediation")
    rosub = ro.add_subparsers(dest="rocmd", required=True)
    rc = rosub.add_parser("create", help="set the waves before the remediation is served")
    rc.add_argument("remediation_id")
    _add_plan_options(rc)
    rosub.add_parser("list")
    kb = sub.add_parser(
        "rule",
        help="known-bad rules: content judged bad once (approved M of N), fixed in every later incident "
        "with no new approval",
    )
    kbs = kb.add_subparsers(dest="rulecmd", required=True)
    kbs.add_parser("list")
    kc = kbs.add_parser("create", help="publish a rule (operator); it acts once approved")
    kc.add_argument("--title", required=True)
    kc.add_argument(
        "--path-pattern", help="relative to the OS root; * ? [..] as in fnmatch (* also across /)"
    )
    kc.add_argument("--sha256", help="the bad content's sha256")
    kc.add_argument(
        "--from-remediation", metavar="REM", help="take the path and sha256 of a remediation's one quarantine"
    )
    kc.add_argument("--approvals", type=int, default=1, help="approvers needed (not the author)")
    kc.add_argument(
        "--staged",
        action="store_true",
        help="serve each incident's fix through a rollout (the options below)",
    )
    _add_plan_options(kc)
    for name in ("approve", "revoke"):
        ka = kbs.add_parser(name)
        ka.add_argument("rule_id")
        if name == "approve":
            ka.add_argument(
                "--key", help="sign the approval with your own key (required once you registered one)"
            )
    for name in ("show", "pause", "resume", "revoke"):
        rosub.add_parser(name).add_argument("rollout_id")
    k = sub.add_parser("key", help="make your own approval key (PATH, 0600) and register it")
    k.add_argument("path")
    u = sub.add_parser("user", help="add a user (admin only); prints their token once")
    u.add_argument("name")
    u.add_argument("--role", required=True, choices=get_args(Role))
    t = sub.add_parser(
        "enrollment-token", help="make, list or revoke enrollment tokens (admin only); default: create"
    )
    tsub = t.add_subparsers(dest="etcmd")
    tc = tsub.add_parser("create", help="make a token; it is printed this once")
    # Also accepted without "create" (the command's older form): the defaults live on the parent
    # only, so that "create" does not overwrite what was given before it.
    for parser in (t, tc):
        own = parser is t
        parser.add_argument("--label", default="fleet" if own else argparse.SUPPRESS)
        parser.add_argument(
            "--expires",
            default=None if own else argparse.SUPPRESS,
            help="how long it enrolls devices: 30m, 24h, 7d (default 24h, at most 365d)",
        )
        parser.add_argument(
            "--uses",
            type=int,
            default=None if own else argparse.SUPPRESS,
            help="how many devices it may enroll (default: any number until it expires)",
        )
    tsub.add_parser("list", help="every token: state, uses, expiry (never the token itself)")
    tsub.add_parser("revoke", help="the token enrolls nobody from now on").add_argument("token_id")
    e = sub.add_parser("events", help="the timeline")
    e.add_argument("--device")
    e.add_argument("--after", type=int, default=0)
    a = sub.add_parser("audit", help="the hash-chained audit log")
    asub = a.add_subparsers(dest="acmd", required=True)
    al = asub.add_parser("list", help="every entry")
    al.add_argument("--device")
    al.add_argument("--after", type=int, default=0)
    av = asub.add_parser("verify", help="check the chain; exit 1 if an entry was edited or removed")
    av.add_argument("--expect-head", help="a head (SEQ:HASH) you recorded earlier, elsewhere")
    # --json is a global option, but people type it last too: accept it anywhere.
    argv = list(sys.argv[1:] if argv is None else argv)
    want_json = "--json" in argv
    args = p.parse_args([a for a in argv if a != "--json"])
    args.json = want_json
    try:
        out = asyncio.run(_run(args))
    except ServerRefused as exc:
        print(f"recovery-admin: {exc.message}", file=sys.stderr)
        return 2
    except ServerUnreachable as exc:
        print(f"recovery-admin: {exc}", file=sys.stderr)
        return 3
    except (ServerError, ProtocolError, ValidationError) as exc:  # bad input, key file, answer
        print(f"recovery-admin: {exc}", file=sys.stderr)
        return 2
    if args.json or (out.rows is None and out.text is None):
        print(json.dumps(_plain(out.data), indent=2))
    elif out.text is not None:
        print(out.text)
    else:
        if out.heading:
            print(out.heading)
        print(_table(out.rows or [], out.cols))
    return out.code


if __name__ == "__main__":
    sys.exit(main())
