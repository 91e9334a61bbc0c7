#!/usr/bin/env python3
"""Benchmark: a fleet's incident, from the first crash report to the rollout's end.

    .venv/bin/python scripts/bench_fleet.py [--devices 10000[,30000,100000]] [--postgres URL]
                                           [--concurrency 64] [--failure-rate 0.02] [--people-at all]
    .venv/bin/python scripts/bench_fleet.py --in-process [--devices 10000] [--store sqlite|PATH|URL]

**Over HTTP** (the default), for each fleet size in ``--devices``: the devices are enrolled in
process before the server starts (not timed), then one ``recovery-server serve`` (SQLite, or
``--postgres``) is pinned to core 0 and one client process to core 1 (with fewer than two
cores nothing is pinned). In the client every device is a ``tests/fleetsim.HttpDevice``: the
agent's own HTTP client (``DeviceClient``, with its retries), its own Ed25519 key, and the
server key pinned. All of them crash at once: each asks for a challenge and sends signed
diagnostics (``--concurrency`` reports in flight: the rest wait their turn, as devices that
retry would), then waits for its directive on long polls of 300 s, the agent's default. An
operator and an approver act through the admin API as soon as the first report is in (a
person's reaction time is not part of the figure), or with ``--people-at all`` once every
report is in and every device waits (as in July 2024, where the fix came after the crashes):
a remediation, a staged rollout (a canary of 50 named devices, then 10%, then 100%; a wave
passes with 40 outcomes at 90% success) and the approval. A device served a directive verifies
it, then reports its result and its healthy boot (``--failure-rate`` of them report a failure
instead), ``--concurrency`` at once.

Printed per fleet size, in seconds from the first report: all reports in, the approval, the
first and the last directive, the rollout's end (its last wave's gate passed) and the last
device done; the server's CPU time per device, the most polls waiting at once, and the
requests the client asked again. Long polls hold one connection each, so the server is
started with ``--max-connections`` above the fleet, both processes' open-files limits are
raised (as root; otherwise to the hard limit, and the run says so), and the client spreads
its connections over several loopback addresses (the ephemeral ports of one address run out
near 28,000).

**In process** (``--in-process``): today's ``tests/fleetsim.FleetSim`` calls the service
directly, no HTTP; every device signs its enrollment, diagnostics, result and health with its
own key and verifies its directive against the pinned server key.

Nothing is asserted (the tests do that).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_ingest import _cpu_seconds, _key, enroll, run_client, server_of_this_checkout  # noqa: E402

from recovery_agent.protocol.keys import SigningKey  # noqa: E402
from recovery_server.access import User, console  # noqa: E402
from recovery_server.service import RecoveryService  # noqa: E402
from recovery_server.store import Store  # noqa: E402
from tests.fleetsim import BAD_PATH, BAD_SHA, FleetSim  # noqa: E402

CANARY = 50
WAVES = ({"name": "10%", "percent": 10}, {"name": "100%", "percent": 100})
GATE = {"min_devices": 40, "min_success_rate": 0.9, "halt_failure_rate": 0.2, "halt_min_devices": 40}
POLL_WAIT_S = 300.0
MIN_FLEET = 500  # 10% of it holds the gate's 40 outcomes, with room for the failures
PER_ADDRESS = 20_000  # client connections per loopback source address
SPARE_FILES = 2_048  # the open-files limit above the fleet's connections


def rollout_plan(device_ids: list[str]) -> dict[str, Any]:
    """The staged rollout of both modes: a canary of the first devices, 10%, then everyone."""
    return {"waves": [{"name": "canary", "devices": device_ids[:CANARY]}, *WAVES], **GATE}


def in_process(args: argparse.Namespace) -> int:
    args.devices = args.devices[0]
    url = (
        str(Path(tempfile.mkdtemp(prefix="qmr-bench-")) / "fleet.db")
        if args.store == "sqlite"
        else args.store
    )
    svc = RecoveryService(store=Store(url), server_key=SigningKey.generate())
    for name, role in (("admin", "admin"), ("oscar", "operator"), ("bob", "approver")):
        svc.create_user(console("setup"), name, role)
    sim = FleetSim(svc, args.devices)
    t0 = time.perf_counter()
    sim.enroll_all(svc.create_enrollment_token(User("admin", "admin")).token)
    sim.crash_all()
    inc = svc.incidents(User("oscar", "operator"))[0].incident_id
    rem = svc.create_remediation(
        User("oscar", "operator"),
        title="q",
        incident_id=inc,
        actions=[{"type": "quarantine_file", "path": BAD_PATH, "sha256": BAD_SHA}],
    )
    ro = svc.create_rollout(
        User("oscar", "operator"),
        rem.remediation_id,
        rollout_plan([d.device_id for d in sim.devices]),
    )
    svc.approve(User("bob", "approver"), rem.remediation_id)
    rounds = sim.run(lambda wave: args.failure_rate)
    total = time.perf_counter() - t0
    status = svc.rollout(User("oscar", "operator"), ro.rollout_id)
    print(
        f"store: {svc.store.dialect} ({'temp file' if args.store == 'sqlite' else args.store.split('@')[-1]})"
    )
    print(f"devices: {args.devices}, rounds: {rounds}, rollout: {status.state}")
    for w in status.waves:
        print(f"  wave {w.name:<7} served {w.served:>6}  succeeded {w.succeeded:>6}  failed {w.failed:>5}")
    for step, seconds in sim.timings.items():
        print(f"  {step:<8} {seconds:7.2f} s")
    requests = args.devices * 6  # enroll, challenge, diagnostics, poll, result, health
    print(f"total {total:.1f} s, {requests / total:,.0f} protocol messages/s")
    return 0


# --------------------------------------------------------------------------- over HTTP


def prepare(store_url: str, data: Path, n: int) -> dict[str, Any]:
    """``n`` devices enrolled (in process, through the service), an operator and an approver:
    what the client needs."""
    from recovery_agent.protocol.keys import public_b64

    devices = [
        {"device_id": device_id, "private": key.private_pem().decode()}
        for device_id, key in enroll(store_url, data, n, "fleet")
    ]
    svc = RecoveryService(store=Store(store_url), server_key=SigningKey.load(data / "server.key"))
    operator = svc.create_user(console("bench"), "oscar", "operator")
    approver = svc.create_user(console("bench"), "bea", "approver")
    svc.store.close()
    return {
        "devices": devices,
        "server_public": public_b64(svc.server_key.public),
        "operator_token": operator.token,
        "approver_token": approver.token,
    }


def _files_limit(n: int) -> None:
    """Raise this process's open-files limit to ``n`` (the hard limit too, as root); else to
    the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= n:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, max(n, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _start(core: int | None, files: int):  # type: ignore[no-untyped-def]
    def pre() -> None:
        _files_limit(files)
        if core is not None:
            os.sched_setaffinity(0, {core})

    return pre


async def client(
    plan_file: Path, url: str, server_pid: int, concurrency: int, failure_rate: float, people_at: str
) -> dict[str, Any]:
    import aiohttp

    from recovery_agent.protocol.admin import AdminClient, RolloutPlan
    from recovery_agent.protocol.client import DeviceClient, RetryPolicy
    from recovery_agent.protocol.keys import key_id, public_from_b64
    from tests.fleetsim import HttpDevice

    plan = json.loads(plan_file.read_text())
    devices = plan["devices"]
    n = len(devices)
    server_key = public_from_b64(plan["server_public"])
    ring = {key_id(server_key): server_key}
    # The agent's retries, with room for a server that stays busy for minutes.
    retry = RetryPolicy(attempts=100, max_delay_s=3600.0)
    sessions = [
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, local_addr=(f"127.0.0.{2 + k}", 0)))
        for k in range(math.ceil(n / PER_ADDRESS))
    ]
    clients = [DeviceClient(url, session=s, retry=retry, timeout_s=600.0) for s in sessions]
    rng = random.Random(291)
    gate = asyncio.Semaphore(concurrency)
    marks: dict[str, float] = {}
    served: list[float] = []
    done: list[float] = []
    first_receipt: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    all_waiting = asyncio.Event()
    counts = {"reported": 0, "waiting": 0, "most_waiting": 0, "renewed": 0, "failed": 0}

    def mark(name: str) -> None:
        marks.setdefault(name, time.monotonic())

    async def device(i: int, d: dict[str, str]) -> None:
        dev = HttpDevice(d["device_id"], clients[i // PER_ADDRESS], ring, key=_key(d["private"]))
        async with gate:
            mark("first_report")
            receipt = await dev.report()
        counts["reported"] += 1
        if not first_receipt.done():
            first_receipt.set_result(receipt.incident_id)
        if counts["reported"] == n:
            mark("all_reported")
        counts["waiting"] += 1
        counts["most_waiting"] = max(counts["most_waiting"], counts["waiting"])
        if counts["waiting"] == n:
            all_waiting.set()
        try:
            while await dev.poll(POLL_WAIT_S) is None:
                counts["renewed"] += 1
        finally:
            counts["waiting"] -= 1
        served.append(time.monotonic())
        async with gate:
            if rng.random() < failure_rate:
                counts["failed"] += 1
                await dev.fail()
            else:
                await dev.recover()
        done.append(time.monotonic())

    async def people() -> dict[str, Any]:
        """The operator and the approver, as soon as the first report is in (or all wait)."""
        async with (
            AdminClient(url, plan["operator_token"]) as operator,
            AdminClient(url, plan["approver_token"]) as approver,
        ):
            incident = await first_receipt
            if people_at == "all":
                await all_waiting.wait()
            rem = await operator.create_remediation(
                "quarantine the bad channel file",
                [{"type": "quarantine_file", "path": BAD_PATH, "sha256": BAD_SHA}],
                incident_id=incident,
            )
            ids = [d["device_id"] for d in devices]
            ro = await operator.create_rollout(
                rem.remediation_id, RolloutPlan.model_validate(rollout_plan(ids))
            )
            await approver.approve(rem.remediation_id)
            mark("approved")
            while ro.state == "active":
                await asyncio.sleep(0.5)
                ro = await operator.rollout(ro.rollout_id)
            mark("rollout_end")
            return {"state": ro.state, "reason": ro.reason, "waves": [w.model_dump() for w in ro.waves]}

    cpu0 = _cpu_seconds(server_pid)
    try:
        tasks = [asyncio.create_task(device(i, d)) for i, d in enumerate(devices)]
        rollout = await people()
        await asyncio.gather(*tasks)
    finally:
        for session in sessions:
            await session.close()
    cpu = _cpu_seconds(server_pid) - cpu0
    t0 = marks["first_report"]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "devices": n,
        "at": {
            "all_reported": marks["all_reported"] - t0,
            "approved": marks["approved"] - t0,
            "first_directive": min(served) - t0,
            "last_directive": max(served) - t0,
            "rollout_end": marks["rollout_end"] - t0,
            "last_done": max(done) - t0,
        },
        "rollout": rollout,
        "server_cpu_s": cpu,
        "client_cpu_s": usage.ru_utime + usage.ru_stime,
        "most_waiting": counts["most_waiting"],
        "renewed": counts["renewed"],
        "failed": counts["failed"],
    }


def run_http(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """One fleet size: enroll, start the server, run the client; the client's figures."""
    cores = (0, 1) if (os.cpu_count() or 1) >= 2 else (None, None)
    files = n + SPARE_FILES
    with tempfile.TemporaryDirectory(prefix="qmr-bench-fleet-") as tmp:
        work = Path(tmp)
        print(f"{n} devices: enrolling (in process, not timed) ...", flush=True)
        with server_of_this_checkout(
            work,
            args.postgres,
            lambda url, data: prepare(url, data, n),
            "--max-connections",
            str(n + 1024),
            preexec_fn=_start(cores[0], files),
        ) as (plan, server, port):
            print(f"{n} devices: the incident (server on port {port}) ...", flush=True)
            result = run_client(
                __file__, work, plan, port, server.pid,
                "--concurrency", str(args.concurrency), "--failure-rate", str(args.failure_rate),
                "--people-at", args.people_at,
                preexec_fn=_start(cores[1], files),
            )  # fmt: skip
            result["files_limit"] = _files_of(server.pid)
            return result


def _files_of(pid: int) -> int:
    """A process's open-files limit."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    return 0


def report(results: list[dict[str, Any]], store: str, people_at: str) -> None:
    cols = ("all_reported", "approved", "first_directive", "last_directive", "rollout_end", "last_done")
    when = "at the first report" if people_at == "first" else "once all devices wait"
    print(
        f"\nan incident over HTTP ({store}, one server process, people acting {when}), "
        "seconds from the first report:"
    )
    print(f"{'devices':>8} " + " ".join(f"{c.replace('_', ' '):>15}" for c in cols) + "  srv CPU/device")
    for r in results:
        at = r["at"]
        cpu_ms = r["server_cpu_s"] * 1e3 / r["devices"]
        print(f"{r['devices']:>8} " + " ".join(f"{at[c]:>15.1f}" for c in cols) + f"  {cpu_ms:>11.2f} ms")
    for r in results:
        waves = ", ".join(
            f"{w['name']}: {w['served']} served, {w['failed']} failed" for w in r["rollout"]["waves"]
        )
        print(
            f"  {r['devices']}: rollout {r['rollout']['state']} ({waves}); {r['failed']} devices failed "
            f"their fix; at most {r['most_waiting']} polls waiting; {r['renewed']} polls renewed;"
            f" client CPU {r['client_cpu_s']:.0f} s"
        )
        if r["files_limit"] < r["devices"]:
            print(f"  {r['devices']}: the server could open only {r['files_limit']} files (run as root)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--devices",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[10_000],
        help="fleet sizes, comma-separated (default 10000), e.g. 10000,30000,100000",
    )
    ap.add_argument("--in-process", action="store_true", help="the service called in process, no HTTP")
    ap.add_argument(
        "--store",
        default="sqlite",
        help="with --in-process: sqlite (a temp file), a path, or a PostgreSQL URL",
    )
    ap.add_argument("--postgres", help="over HTTP: a PostgreSQL URL instead of SQLite")
    ap.add_argument("--concurrency", type=int, default=64, help="reports (and results) in flight at once")
    ap.add_argument("--failure-rate", type=float, default=0.02)
    ap.add_argument(
        "--people-at",
        choices=["first", "all"],
        default="first",
        help="the operator and approver act at the first report (default), or once all devices wait",
    )
    ap.add_argument("--role", choices=["bench", "client"], default="bench", help=argparse.SUPPRESS)
    ap.add_argument("--plan-file", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "client":
        result = asyncio.run(
            client(
                args.plan_file, args.url, args.server_pid, args.concurrency, args.failure_rate, args.people_at
            )
        )
        print(json.dumps(result))
        return 0
    if args.in_process:
        return in_process(args)
    if min(args.devices) < MIN_FLEET:
        ap.error(
            f"--devices: at least {MIN_FLEET}, or the 10% wave never holds the {GATE['min_devices']} "
            "outcomes its gate waits for"
        )
    store = "PostgreSQL" if args.postgres else "SQLite"
    results = []
    for n in args.devices:
        results.append(run_http(n, args))
        report(results[-1:], store, args.people_at)
    if len(results) > 1:
        report(results, store, args.people_at)
    return 0


if __name__ == "__main__":
    sys.exit(main())
