#!/usr/bin/env python3
"""Benchmark: many devices waiting on long polls, then one approval for all of them.

    .venv/bin/python scripts/bench_longpoll.py [--devices 10000] [--wait 300] [--idle S] [--postgres URL]

One ``recovery-server serve`` (SQLite by default) pinned to core 0, one client pinned to core 1
(with fewer than two cores nothing is pinned). Before the server starts, ``--devices`` devices
are enrolled and their diagnostics stored in process (one incident, a July-2024-shaped crash),
with a remediation written and waiting for its approval. Then:

1. **waiting**: the client opens one long poll per device (``--wait``, default 300 s: the
   agent's default and the server's longest)
   and waits until the server's /metrics says all of them wait;
2. **idle**: for ``--idle`` seconds (default: one long-poll length) nothing changes; the
   server's CPU use in that window (from /proc) is what holding them costs, including each
   poll's renewal when its wait runs out (the agent asks again at once);
3. **approval**: the approver approves through the admin API; the figure is the time from the
   approval's answer to the last device holding its signed directive, and the server's CPU
   per directive.

Printed: the figures of each phase. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_ingest import _cpu_seconds, _pin, run_client, server_of_this_checkout  # noqa: E402  (this folder is on sys.path)

from recovery_agent.protocol.keys import SigningKey  # noqa: E402

BAD_PATH = "var/lib/sensor/channels/C-00000291-00000000-00000032.sys"
BAD_SHA = "b" * 64
OPEN_BATCH = 500


def prepare(store_url: str, data: Path, n: int, log) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Devices enrolled, their diagnostics stored, a remediation waiting for its approval."""
    from recovery_agent.protocol.envelope import seal_bytes
    from recovery_agent.protocol.keys import public_b64
    from recovery_agent.protocol.wire import (
        BootState,
        CrashKind,
        CrashSignature,
        Diagnostics,
        Enrollment,
        FileRecord,
        SystemInfo,
        utcnow,
    )
    from recovery_server.access import User, console
    from recovery_server.limits import RateLimit
    from recovery_server.service import RecoveryService, ServiceSettings
    from recovery_server.store import Store

    svc = RecoveryService(
        store=Store(store_url),
        server_key=SigningKey.load(data / "server.key"),
        settings=ServiceSettings(device_rate=RateLimit(burst=1000, per_minute=1000)),
    )
    token = svc.create_enrollment_token(User("admin", "admin"), max_uses=n).token
    crash = CrashSignature(
        kind=CrashKind.KERNEL_PANIC,
        title="general protection fault in sensor_parse_channel",
        guilty_module="sensor",
        channel_file=BAD_PATH,
    )
    receipts = []
    started = time.monotonic()
    for i in range(n):
        key = SigningKey.generate()
        device_id = f"wait-{i:06d}"
        svc.enroll(
            seal_bytes(
                Enrollment(
                    device_id=device_id,
                    public_key=public_b64(key.public),
                    enrollment_token=token,
                    created_at=utcnow(),
                ),
                key,
            )
        )
        d = Diagnostics(
            device_id=device_id,
            server_nonce=svc.challenge(device_id).nonce,
            agent_nonce=f"{i:032d}",
            created_at=utcnow(),
            agent_version="bench",
            boot=BootState(boot_count=2, boot_limit=2),
            crash=crash,
            system=SystemInfo(),
            channel_files=[FileRecord(path=BAD_PATH, size=172, mtime=0, sha256=BAD_SHA)],
        )
        r = svc.accept_diagnostics(seal_bytes(d, key))
        receipts.append({"report_id": r.report_id, "poll_token": r.poll_token})
        if (i + 1) % 2000 == 0:
            log(f"  {i + 1} devices reported ({time.monotonic() - started:.0f} s)")
    incident = r.incident_id
    operator = svc.create_user(console("bench"), "oscar", "operator")
    approver = svc.create_user(console("bench"), "bea", "approver")
    rem = svc.create_remediation(
        User("oscar", "operator"),
        title="quarantine the bad channel file",
        incident_id=incident,
        actions=[{"type": "quarantine_file", "path": BAD_PATH, "sha256": BAD_SHA}],
    )
    svc.store.close()
    return {
        "receipts": receipts,
        "remediation_id": rem.remediation_id,
        "approver_token": approver.token,
        "operator_token": operator.token,
    }


async def client(url: str, plan_file: Path, server_pid: int, idle_s: float, wait_s: float) -> dict[str, Any]:
    import aiohttp

    plan = json.loads(plan_file.read_text())
    receipts = plan["receipts"]
    n = len(receipts)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n + 1024)), hard))
    served_at: dict[str, float] = {}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=wait_s + 60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        retries = 0
        renewed = 0  # polls whose wait ran out with nothing due (the agent asks again)

        async def wait_for_directive(r: dict[str, str]) -> None:
            nonlocal retries, renewed
            while True:
                try:
                    async with session.get(
                        f"{url}/v1/reports/{r['report_id']}/directive",
                        params={"wait": str(wait_s)},
                        headers={"Authorization": f"Bearer {r['poll_token']}"},
                    ) as resp:
                        body = await resp.json()
                except aiohttp.ClientError:  # as the agent does: ask again
                    retries += 1
                    await asyncio.sleep(0.5)
                    continue
                if resp.status == 200 and body.get("status") == "directive":
                    served_at[r["report_id"]] = time.monotonic()
                    return
                if resp.status >= 400:
                    raise RuntimeError(f"poll answered {resp.status}: {body}")
                renewed += 1

        async def waiting() -> int:
            async with session.get(f"{url}/metrics") as resp:
                text = await resp.text()
            for line in text.splitlines():
                if line.startswith("qmr_long_polls_waiting"):
                    return int(float(line.split()[-1]))
            return 0

        opened = time.monotonic()
        polls = []
        for i in range(0, n, OPEN_BATCH):  # devices arrive in batches, not all in one instant
            polls += [asyncio.create_task(wait_for_directive(r)) for r in receipts[i : i + OPEN_BATCH]]
            await asyncio.sleep(0.2)
        while await waiting() < n:
            if any(p.done() and p.exception() for p in polls):
                raise next(p.exception() for p in polls if p.done() and p.exception())  # type: ignore[misc]
            await asyncio.sleep(0.5)
        all_waiting_s = time.monotonic() - opened
        cpu0, t0, renewed0 = _cpu_seconds(server_pid), time.monotonic(), renewed
        await asyncio.sleep(idle_s)
        idle_cpu = (_cpu_seconds(server_pid) - cpu0) / (time.monotonic() - t0)
        renewed_idle = renewed - renewed0
        still = await waiting()
        cpu1 = _cpu_seconds(server_pid)
        async with session.post(
            f"{url}/v1/admin/remediations/{plan['remediation_id']}/approve",
            headers={"Authorization": f"Bearer {plan['approver_token']}"},
            json={},
        ) as resp:
            if resp.status != 200:
                raise RuntimeError(f"approval answered {resp.status}: {await resp.text()}")
        approved = time.monotonic()
        await asyncio.gather(*polls)
        last = max(served_at.values())
        storm_cpu = _cpu_seconds(server_pid) - cpu1
    return {
        "devices": n,
        "all_waiting_s": round(all_waiting_s, 1),
        "waiting_before_approval": still,
        "idle_cpu_share": round(idle_cpu, 4),
        "approval_to_last_s": round(last - approved, 2),
        "approval_to_first_s": round(min(served_at.values()) - approved, 3),
        "cpu_us_per_directive": round(storm_cpu * 1e6 / n),
        "retries": retries,
        "renewed_idle": renewed_idle,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=10000)
    p.add_argument(
        "--idle",
        type=float,
        help="seconds of nothing changing (default: --wait, one long-poll length, so every "
        "poll's renewal falls in the window)",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=300.0,
        help="each long poll's wait, in seconds (the agent's default: 300)",
    )
    p.add_argument("--postgres", help="a PostgreSQL URL instead of SQLite")
    p.add_argument("--role", choices=["bench", "client"], default="bench", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--plan-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.idle is None:
        args.idle = args.wait
    if args.role == "client":
        print(
            json.dumps(asyncio.run(client(args.url, args.plan_file, args.server_pid, args.idle, args.wait)))
        )
        return 0
    cores = (0, 1) if (os.cpu_count() or 1) >= 2 else (None, None)
    with tempfile.TemporaryDirectory(prefix="qmr-bench-longpoll-") as tmp:
        work = Path(tmp)
        print(f"preparing {args.devices} devices (enrolled, reported, one incident) ...", flush=True)
        with server_of_this_checkout(
            work,
            args.postgres,
            lambda url, data: prepare(url, data, args.devices, print),
            "--metrics",
            "public",
            preexec_fn=_pin(cores[0]),
        ) as (plan, server, port):
            print(f"server on port {port}; {args.devices} long polls ...", flush=True)
            r = run_client(
                __file__, work, plan, port, server.pid, "--idle", str(args.idle), "--wait", str(args.wait),
                preexec_fn=_pin(cores[1]),
            )  # fmt: skip
    store = "PostgreSQL" if args.postgres else "SQLite"
    print(f"\n{r['devices']} devices waiting on long polls ({store}, one server process):")
    print(f"  all waiting after            {r['all_waiting_s']} s")
    print(
        f"  server CPU while idle        {r['idle_cpu_share'] * 100:.1f}% of a core ({args.idle:g} s; "
        f"{r['renewed_idle']} polls ran out and were asked again in it)"
    )
    print(f"  approval to first directive  {r['approval_to_first_s']} s")
    print(f"  approval to last directive   {r['approval_to_last_s']} s")
    print(f"  server CPU per directive     {r['cpu_us_per_directive']} µs")
    print(f"  polls asked again            {r['retries']} (the server closed them; the agent asks again too)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
