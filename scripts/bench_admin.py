#!/usr/bin/env python3
"""Benchmark: the admin API's reads on a fleet-sized incident, and what they cost the devices.

    .venv/bin/python scripts/bench_admin.py [--devices 100000] [--keep]

One ``recovery-server serve`` on SQLite (pinned to core 0, the client on core 1; with fewer
than two cores nothing is pinned), its store holding one incident that ``--devices`` devices
reported: 20 devices enrolled and reported through the service (real signatures, a real
challenge each), then their rows copied in SQL up to ``--devices`` (a copy of a real device
and a real report under a new id each: the benchmark reads, it does not verify them). Setting
up 100,000 takes about a minute and is not timed.

Then, one after the other, each read the dashboard and ``recovery-admin`` make (the dashboard's
overview asks for the incidents and the devices every 3 s), as an operator over HTTP; and,
while each runs, a device asks for a challenge every 20 ms (the device API is on the same
event loop). Printed per read: its HTTP status, the bytes of its answer, its time, the
server's CPU time for it, the longest a device's challenge waited meanwhile (what every
device of the fleet waits while a person looks), and the server's peak resident memory during
it.

Nothing is asserted (tests/test_fleet_reads.py proves the answers are bounded).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_ingest import (  # noqa: E402
    _cpu_seconds,
    _pin,
    diagnostics_template,
    enroll,
    server_of_this_checkout,
)

from recovery_agent.protocol.admin import AdminClient  # noqa: E402
from recovery_agent.protocol.envelope import seal_bytes  # noqa: E402
from recovery_agent.protocol.keys import SigningKey  # noqa: E402
from recovery_agent.protocol.wire import Diagnostics  # noqa: E402

REAL_DEVICES = 20
PING_EVERY_S = 0.02

WALK_DEVICES = "(AdminClient.devices: one request per page)"
# (label, path): {incident} is the incident's id; each path as the dashboard or the CLI asks it.
READS = [
    ("incidents (dashboard overview, every 3 s)", "/v1/admin/incidents"),
    ("devices (dashboard overview, every 3 s)", "/v1/admin/devices?limit=200"),
    ("incident summary (dashboard incident page)", "/v1/admin/incidents/{incident}/summary"),
    ("incident timeline (dashboard incident page)", "/v1/admin/incidents/{incident}/timeline"),
    ("incident with its reports (recovery-admin incidents ID)", "/v1/admin/incidents/{incident}"),
    ("incident's proposed fix (dashboard incident page, once)", "/v1/admin/incidents/{incident}/suggestion"),
    ("incident's correlation (dashboard incident page, once)", "/v1/admin/incidents/{incident}/correlation"),
    ("one device (dashboard device page)", "/v1/admin/devices/clone-000001"),
    ("every device, a page at a time (recovery-admin devices)", WALK_DEVICES),
]


def _clone(
    table: str, db: sqlite3.Connection, template: str, key: str, exprs: dict[str, str], n: int
) -> None:
    """``n`` copies of the row of ``table`` whose ``key`` is ``template``; ``exprs`` give the
    columns that must differ (SQL over ``n``, the copy's number)."""
    columns = [r[1] for r in db.execute(f"PRAGMA table_info({table})")]
    select = ", ".join(exprs.get(c, f"t.{c}") for c in columns)
    db.execute(
        f"WITH RECURSIVE seq(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM seq WHERE n < ?) "
        f"INSERT INTO {table} ({', '.join(columns)}) "
        f"SELECT {select} FROM seq, (SELECT * FROM {table} WHERE {key} = ?) AS t",
        (n, template),
    )


def prepare(store_url: str, data: Path, n: int) -> dict[str, Any]:
    """``REAL_DEVICES`` devices enrolled and reported through the service, copied in SQL up to
    ``n``; an operator's token and the incident's id."""
    from recovery_server.access import console
    from recovery_server.service import RecoveryService
    from recovery_server.store import Store

    enrolled = enroll(store_url, data, REAL_DEVICES, "real")
    svc = RecoveryService(store=Store(store_url), server_key=SigningKey.load(data / "server.key"))
    receipt = None
    for i, (device_id, key) in enumerate(enrolled):
        payload = json.loads(diagnostics_template(device_id))
        payload.update(
            server_nonce=svc.challenge(device_id).nonce, agent_nonce=f"agent-nonce-{i:02d}-{'x' * 16}"
        )
        receipt = svc.accept_diagnostics(seal_bytes(Diagnostics.model_validate(payload), key))
    assert receipt is not None
    operator = svc.create_user(console("bench"), "oscar", "operator")
    svc.store.close()

    copies = n - REAL_DEVICES
    db = sqlite3.connect(store_url)
    with db:
        _clone(
            "devices", db, enrolled[0][0], "device_id",
            {"device_id": "printf('clone-%06d', n)", "key_id": "lower(hex(randomblob(32)))"}, copies,
        )  # fmt: skip
        _clone(
            "reports", db, receipt.report_id, "report_id",
            {
                "report_id": "printf('rpt-clone-%06d', n)",
                "device_id": "printf('clone-%06d', n)",
                "diagnostics_sha256": "lower(hex(randomblob(32)))",
                "poll_token_sha256": "lower(hex(randomblob(32)))",
            },
            copies,
        )  # fmt: skip
        db.execute(
            "UPDATE incidents SET report_count = (SELECT count(*) FROM reports WHERE incident_id = ?) "
            "WHERE incident_id = ?",
            (receipt.incident_id, receipt.incident_id),
        )
    db.close()
    return {"token": operator.token, "incident": receipt.incident_id}


def _reset_peak(pid: int) -> None:
    """Start the process's peak resident memory again from now (Linux, as its owner or root)."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def _peak_mb(pid: int) -> float | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


async def _ping(s: Any, url: str, done: asyncio.Event, waits: list[float]) -> None:
    """A device asking for a challenge every PING_EVERY_S until ``done``: how long each took."""
    while not done.is_set():
        t0 = time.perf_counter()
        async with s.post(f"{url}/v1/challenge", json={"device_id": "real-00000"}) as r:
            await r.read()
        waits.append(time.perf_counter() - t0)
        try:
            await asyncio.wait_for(done.wait(), PING_EVERY_S)
        except TimeoutError:
            pass


async def measure(url: str, token: str, incident: str, server_pid: int) -> list[dict[str, Any]]:
    import aiohttp

    rows = []
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        for label, path in READS:
            waits: list[float] = []
            done = asyncio.Event()

            ping = asyncio.create_task(_ping(s, url, done, waits))
            await asyncio.sleep(0.2)
            _reset_peak(server_pid)
            cpu0, t0 = _cpu_seconds(server_pid), time.perf_counter()
            if path == WALK_DEVICES:
                async with AdminClient(url, token) as admin:
                    devices = await admin.devices()
                body, status = json.dumps([d.model_dump(mode="json") for d in devices]).encode(), 200
            else:
                async with s.get(
                    url + path.format(incident=incident), headers={"Authorization": f"Bearer {token}"}
                ) as r:
                    body = await r.read()
                    status = r.status
            elapsed, cpu = time.perf_counter() - t0, _cpu_seconds(server_pid) - cpu0
            peak = _peak_mb(server_pid)
            done.set()
            await ping
            rows.append(
                {
                    "read": label,
                    "status": status,
                    "bytes": len(body),
                    "seconds": elapsed,
                    "server_cpu_s": cpu,
                    "device_wait_max_s": max(waits) if waits else None,
                    "server_peak_mb": peak,
                }
            )
            print(
                f"{label:<58} {status:>4} {len(body):>12,} {elapsed:>8.3f} {cpu:>8.3f} "
                f"{max(waits) if waits else float('nan'):>8.3f} {peak or float('nan'):>8.0f}",
                flush=True,
            )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=100_000, help="devices that reported the incident")
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    cores = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)
    with tempfile.TemporaryDirectory(prefix="qmr-bench-admin-") as tmp:
        work = Path(tmp)
        print(f"bench_admin: {args.devices} devices in one incident (setting up, not timed) ...", flush=True)
        with server_of_this_checkout(
            work, None, lambda url, data: prepare(url, data, args.devices), preexec_fn=_pin(cores[0])
        ) as (plan, server, port):
            os.sched_setaffinity(0, {cores[1]} if cores[1] is not None else set(cpus))
            print(
                f"{'read':<58} {'HTTP':>4} {'bytes':>12} {'seconds':>8} {'srv CPU':>8} {'dev wait':>8} "
                f"{'peak MB':>8}"
            )
            asyncio.run(measure(f"http://127.0.0.1:{port}", plan["token"], plan["incident"], server.pid))
    print(
        "(dev wait: the longest a device's challenge took while the read ran, asked every 20 ms; "
        "peak MB: the server's resident memory at its highest during the read)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
