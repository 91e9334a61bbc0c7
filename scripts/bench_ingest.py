#!/usr/bin/env python3
"""Benchmark: signed diagnostics into the recovery server, against the floor of the same protocol.

    .venv/bin/python scripts/bench_ingest.py [--seconds 10] [--concurrency 32] [--devices 4000]
                                             [--postgres URL] [--only floor|sqlite|postgresql]
                                             [--processes 2]

What it runs, one after the other, each server pinned to core 0 and the one client to core 1
(with fewer than two cores nothing is pinned, and the figures say less):

- **floor, 1 request**: a bare aiohttp endpoint that parses the envelope and verifies its one
  Ed25519 signature, nothing else (no store, no model, no challenge);
- **floor, 2 requests**: the same with the challenge round trip first (a random nonce), the
  shape of the real protocol;
- **floor + the checks, 2 requests**: the same, but the report is opened as the server opens
  it (``open_envelope``: strict JSON of the envelope and the payload, the signature, the typed
  message; then the crash signature): every check the protocol asks for, with the device's key
  in memory and nothing stored. What a server could reach with the project's parsing and
  validation and a store that cost nothing;
- **recovery-server serve** on SQLite (a fresh data directory), then on PostgreSQL when a URL is
  given (``--postgres``, or ``QMR_TEST_POSTGRES`` as ``scripts/postgres.sh start`` prints it;
  a fresh schema, dropped afterwards); then ``--processes`` servers on that database at once
  (default 2, all pinned to the server core: two cores cannot show scaling, so the figures to
  take are each process's CPU per report, PostgreSQL's, and the time spent waiting for the
  write lock, from which a larger machine's capacity can be worked out). The client sends each
  report's challenge to one process and its diagnostics to the next.

The client is the same for all: enrolled devices (enrolled in process before the server
starts), each report a challenge and then signed diagnostics of the July 2024 shape (a kernel
panic in the sensor driver with a panic excerpt, 12 drivers, 24 channel files, 6 driver-store
files). ``--concurrency`` reports are in flight at once. After a warm-up of 2 s it counts for
``--seconds``; the devices are many enough that the per-device rate limit never answers 429.

Printed per server: reports/s, the server process's CPU time per report (from /proc: a server
below 100% of its core is waiting on the client or on the database), p50/p99 latency of one
report (both requests), the client's CPU use (near 100%: the client is the bound, not the
server) and the ratio to the two-request floor; for the servers, reports per commit and the
wait for the write lock per transaction (from their /metrics). On PostgreSQL the database's own
processes are not pinned; their CPU per report is printed apart (every ``postgres`` process of
the machine). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recovery_agent.protocol.crashreport import RULES_VERSION  # noqa: E402
from recovery_agent.protocol.envelope import canonical_json, pae  # noqa: E402
from recovery_agent.protocol.keys import SigningKey, public_b64  # noqa: E402
from recovery_agent.protocol.wire import (  # noqa: E402
    BootState,
    CrashKind,
    CrashSignature,
    Diagnostics,
    Enrollment,
    FileRecord,
    SystemInfo,
    utcnow,
)

WARMUP_S = 2.0
PLACEHOLDER_SERVER = "S" * 32
PLACEHOLDER_AGENT = "A" * 32
EXCERPT = "\n".join(
    [
        "BUG: unable to handle page fault for address: ffff9e2a00000050",
        "#PF: supervisor read access in kernel mode",
        "Oops: 0000 [#1] PREEMPT SMP NOPTI",
        "CPU: 0 PID: 187 Comm: modprobe Tainted: G           OE      6.1.0-28-amd64 #1  Debian 6.1.119-1",
        "RIP: 0010:sensor_parse_channel+0x142/0xf68 [sensor]",
        "Call Trace:",
        " <TASK>",
        " sensor_load_channels+0x1a4/0x2b0 [sensor]",
        " sensor_init+0x9b/0xff0 [sensor]",
        " do_one_initcall+0x5b/0x220",
        " do_init_module+0x4c/0x200",
        " __do_sys_finit_module+0xac/0x120",
        " do_syscall_64+0x55/0xb0",
        " entry_SYSCALL_64_after_hwframe+0x6e/0xd8",
        " </TASK>",
        "Kernel panic - not syncing: Fatal exception",
    ]
)


def _records(prefix: str, n: int, ext: str) -> list[FileRecord]:
    return [
        FileRecord(
            path=f"{prefix}/file-{i:03d}.{ext}",
            size=4096 + i,
            mtime=1_721_370_000.0 + i,
            sha256=f"{i:064x}",
        )
        for i in range(n)
    ]


def diagnostics_template(device_id: str) -> bytes:
    """The canonical payload of one report, with placeholder nonces the client fills in."""
    d = Diagnostics(
        device_id=device_id,
        server_nonce=PLACEHOLDER_SERVER,
        agent_nonce=PLACEHOLDER_AGENT,
        created_at=utcnow(),
        agent_version="0.1.0",
        boot=BootState(boot_count=2, boot_limit=2),
        crash=CrashSignature(
            kind=CrashKind.KERNEL_PANIC,
            title="general protection fault in sensor_parse_channel",
            guilty_module="sensor",
            guilty_frame="sensor_parse_channel",
            channel_file="var/lib/sensor/channels/C-00000291-00000000-00000032.sys",
            source="pstore",
            excerpt=EXCERPT,
            rules_version=RULES_VERSION,  # made by an agent of this version: not re-parsed
        ),
        system=SystemInfo(os_release="Debian GNU/Linux 12 (bookworm)", kernel_version="6.1.0-28-amd64"),
        drivers=_records("lib/modules/6.1.0-28-amd64/extra", 12, "ko"),
        channel_files=_records("var/lib/sensor/channels", 24, "sys"),
        driver_store=_records("var/lib/driver-store/sensor", 6, "ko"),
    )
    return canonical_json(d.model_dump(mode="json"))


# --------------------------------------------------------------------------- the floor server


def serve_floor(port_file: Path, keys_file: Path, checks: bool = False) -> None:
    """The floor: parse the envelope, verify its one signature by the device's key, answer.
    With ``checks``, open the report as the server does (strict JSON, signature, model), store
    nothing."""
    from aiohttp import web
    from cryptography.exceptions import InvalidSignature

    from recovery_agent.protocol.crashreport import rederive
    from recovery_agent.protocol.envelope import EnvelopeError, open_envelope
    from recovery_agent.protocol.keys import key_id, public_from_b64

    keys = {}
    for pub in json.loads(keys_file.read_text()).values():
        public = public_from_b64(pub)
        keys[key_id(public)] = public

    async def challenge(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"nonce": secrets.token_urlsafe(24), "expires_at": "2099-01-01T00:00:00Z"})

    async def diagnostics(request: web.Request) -> web.Response:
        if checks:
            try:
                report = open_envelope(await request.read(), Diagnostics, keys)
            except EnvelopeError as exc:
                return web.json_response({"error": str(exc)}, status=400)
            sig = rederive(report.message.crash)
            return web.json_response({"report_id": secrets.token_hex(8), "incident_id": sig.id[:12]})
        env = json.loads(await request.read())
        sig = env["signatures"][0]
        payload = base64.b64decode(env["payload"])
        try:
            keys[sig["keyid"]].verify(base64.b64decode(sig["sig"]), pae(env["payloadType"], payload))
        except (KeyError, InvalidSignature):
            return web.json_response({"error": "bad signature"}, status=403)
        return web.json_response({"report_id": secrets.token_hex(8)})

    app = web.Application(client_max_size=1 << 20)
    app.router.add_post("/v1/challenge", challenge)
    app.router.add_post("/v1/diagnostics", diagnostics)

    async def main() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        tmp = port_file.with_name(port_file.name + ".tmp")
        tmp.write_text(f"{port}\n")
        os.replace(tmp, port_file)
        await asyncio.Event().wait()

    asyncio.run(main())


# --------------------------------------------------------------------------- the client


def _key(pem: str) -> SigningKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(pem.encode(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return SigningKey(key)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_of(pids: list[int]) -> list[float]:
    out = []
    for pid in pids:
        try:
            out.append(_cpu_seconds(pid))
        except (FileNotFoundError, ProcessLookupError):  # a database backend that ended
            out.append(0.0)
    return out


async def drive(
    urls: list[str],
    devices_file: Path,
    server_pids: list[int],
    seconds: float,
    concurrency: int,
    two: bool,
    db_pids: list[int] | None = None,
) -> dict[str, Any]:
    """Reports as fast as the servers take them; figures of the measured window. With several
    servers, report i asks ``urls[i]`` for its challenge and sends its diagnostics to the next
    one (the processes accept each other's challenges)."""
    import aiohttp

    devices = json.loads(devices_file.read_text())
    prepared = [(d["device_id"], _key(d["private"]), d["template"].encode()) for d in devices]
    payload_type = Diagnostics.PAYLOAD_TYPE
    next_device = 0
    latencies: list[float] = []
    errors: dict[str, int] = {}
    measuring = False
    stop = False

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal next_device
        device_id, key, template = prepared[next_device % len(prepared)]
        url, next_url = urls[next_device % len(urls)], urls[(next_device + 1) % len(urls)]
        next_device += 1
        t0 = time.perf_counter()
        if two:
            async with session.post(f"{url}/v1/challenge", json={"device_id": device_id}) as r:
                body = await r.read()
                if r.status != 200:
                    errors[f"challenge {r.status}"] = errors.get(f"challenge {r.status}", 0) + 1
                    return
                nonce = json.loads(body)["nonce"]
        else:
            nonce = secrets.token_urlsafe(24)
        payload = template.replace(PLACEHOLDER_SERVER.encode(), nonce.encode()).replace(
            PLACEHOLDER_AGENT.encode(), secrets.token_urlsafe(24).encode()
        )
        sig = key.private.sign(pae(payload_type, payload))
        env = canonical_json(
            {
                "payload": base64.b64encode(payload).decode(),
                "payloadType": payload_type,
                "signatures": [{"keyid": key.key_id, "sig": base64.b64encode(sig).decode()}],
            }
        )
        async with session.post(f"{next_url}/v1/diagnostics", data=env) as r:
            await r.read()
            if r.status != 200:
                errors[f"diagnostics {r.status}"] = errors.get(f"diagnostics {r.status}", 0) + 1
                return
        if measuring:
            latencies.append(time.perf_counter() - t0)

    async def worker(session: aiohttp.ClientSession) -> None:
        while not stop:
            await one(session)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        workers = [asyncio.create_task(worker(session)) for _ in range(concurrency)]
        await asyncio.sleep(WARMUP_S)
        measuring = True
        db_pids = db_pids or []
        cpu0, db0, own0, t0 = _cpu_of(server_pids), _cpu_of(db_pids), time.process_time(), time.perf_counter()
        await asyncio.sleep(seconds)
        measuring = False
        cpu1, db1, own1, t1 = _cpu_of(server_pids), _cpu_of(db_pids), time.process_time(), time.perf_counter()
        stop = True
        await asyncio.gather(*workers)
    wall = t1 - t0
    latencies.sort()
    n = len(latencies)
    spent = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
    db_spent = sum(b - a for a, b in zip(db0, db1, strict=True))
    return {
        "reports": n,
        "per_s": n / wall,
        "server_cpu_us": sum(spent) / n * 1e6 if n else None,
        "server_cpu_share": sum(spent) / wall,
        "per_process_cpu_us": [x / n * 1e6 for x in spent] if n else None,
        "db_cpu_us": db_spent / n * 1e6 if n and db_pids else None,
        "client_cpu_share": (own1 - own0) / wall,
        "p50_ms": latencies[n // 2] * 1e3 if n else None,
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1e3 if n else None,
        "errors": errors,
    }


# --------------------------------------------------------------------------- the runs


def _pin(core: int | None):  # type: ignore[no-untyped-def]
    if core is None:
        return None
    return lambda: os.sched_setaffinity(0, {core})


def server_argv(prefix: list[Any], data: Path, database: str | None, *command: Any) -> list[Any]:
    """``prefix`` (how to run ``recovery-server``) with the data directory, the database if not
    the default SQLite, and ``command`` (such as ``serve(...)``)."""
    return [*prefix, "--data", data, *(["--database", database] if database else []), *command]


def serve(port_file: Path, *extra: str) -> tuple[Any, ...]:
    """The ``serve`` command of a benchmark: a free port written to ``port_file``, no access log."""
    return ("serve", "--port", "0", "--port-file", port_file, "--quiet", *extra)


@contextlib.contextmanager
def server_of_this_checkout(
    work: Path, database: str | None, prepare: Callable[[str, Path], Any], *extra: str, preexec_fn: Any = None
) -> Iterator[tuple[Any, subprocess.Popen[bytes], int]]:
    """For the benchmarks of one server: ``recovery-server init`` in ``work``/data (on
    ``database``, or SQLite there), then ``prepare(store_url, data)`` in process before the
    server starts, then ``serve`` (no access log; ``extra`` options) with ``preexec_fn``.
    Yields what ``prepare`` returned, the server process and its port; stops it after."""
    from recovery_server.portfile import wait_for_port_file

    # The server of this checkout (whatever the venv has installed).
    server_cmd = [sys.executable, "-m", "recovery_server.cli"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    data = work / "data"
    subprocess.run(
        server_argv(server_cmd, data, database, "init", "--token-file", work / "admin.token"),
        check=True,
        capture_output=True,
        env=env,
    )
    prepared = prepare(database or str(data / "recovery.db"), data)
    with open(work / "server.log", "w") as log:
        server = subprocess.Popen(
            server_argv(server_cmd, data, database, *serve(work / "port", *extra)),
            stdout=subprocess.DEVNULL,
            stderr=log,
            preexec_fn=preexec_fn,
            env=env,
        )
        try:
            yield (
                prepared,
                server,
                wait_for_port_file(work / "port", lambda: server.poll() is None, timeout_s=120),
            )
        finally:
            server.terminate()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(30)


def run_client(
    script: str, work: Path, plan: Any, port: int, server_pid: int, *extra: str, preexec_fn: Any = None
) -> dict[str, Any]:
    """The client side of a benchmark: ``script --role client`` in a process of its own, given
    ``plan`` (as ``--plan-file``), the server's URL and pid and ``extra`` options; the JSON it
    prints. A client that fails ends the benchmark with its error."""
    plan_file = work / "plan.json"
    plan_file.write_text(json.dumps(plan))
    out = subprocess.run(
        [
            sys.executable,
            script,
            "--role",
            "client",
            "--plan-file",
            str(plan_file),
            "--url",
            f"http://127.0.0.1:{port}",
            "--server-pid",
            str(server_pid),
            *extra,
        ],  # fmt: skip
        capture_output=True,
        text=True,
        preexec_fn=preexec_fn,
    )
    if out.returncode != 0:
        raise SystemExit(f"the client failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout))


def _wait_port(port_file: Path, proc: subprocess.Popen[bytes]) -> int:
    from recovery_server.portfile import wait_for_port_file

    return wait_for_port_file(port_file, lambda: proc.poll() is None, timeout_s=120)


def _client(
    args: argparse.Namespace,
    url: str,
    devices_file: Path,
    pid: int | list[int],
    two: bool,
    core: int | None,
    db_pids: list[int] | None = None,
) -> dict[str, Any]:
    pids = pid if isinstance(pid, list) else [pid]
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--role",
            "client",
            "--url",
            url,
            "--devices-file",
            str(devices_file),
            "--server-pid",
            ",".join(map(str, pids)),
            "--db-pids",
            ",".join(map(str, db_pids or [])),
            "--seconds",
            str(args.seconds),
            "--concurrency",
            str(args.concurrency),
            *(["--two"] if two else []),
        ],
        check=True,
        capture_output=True,
        text=True,
        preexec_fn=_pin(core),
    )
    return dict(json.loads(out.stdout))


def enroll(store_url: str, data: Path, n: int, prefix: str) -> list[tuple[str, SigningKey]]:
    """Enroll ``n`` devices (``prefix``-00000, ...) into the server's store, in process, through
    the service: their ids and keys."""
    from recovery_agent.protocol.envelope import seal_bytes
    from recovery_server.access import User
    from recovery_server.service import RecoveryService
    from recovery_server.store import Store

    svc = RecoveryService(store=Store(store_url), server_key=SigningKey.load(data / "server.key"))
    token = svc.create_enrollment_token(User("admin", "admin"), max_uses=n).token
    out = []
    started = time.monotonic()
    for i in range(n):
        key = SigningKey.generate()
        device_id = f"{prefix}-{i:05d}"
        msg = Enrollment(
            device_id=device_id,
            public_key=public_b64(key.public),
            enrollment_token=token,
            created_at=utcnow(),
        )
        svc.enroll(seal_bytes(msg, key))
        out.append((device_id, key))
        if (i + 1) % 20_000 == 0:
            print(f"  {i + 1} devices enrolled ({time.monotonic() - started:.0f} s)", flush=True)
    svc.store.close()
    return out


def _enroll(store_url: str, data: Path, n: int) -> list[dict[str, str]]:
    """Enroll ``n`` devices in process; their keys and report templates."""
    return [
        {
            "device_id": device_id,
            "private": key.private_pem().decode(),
            "public": public_b64(key.public),
            "template": diagnostics_template(device_id).decode(),
        }
        for device_id, key in enroll(store_url, data, n, "bench")
    ]


def run_server(
    args: argparse.Namespace,
    label: str,
    work: Path,
    database: str | None,
    cores: tuple[int | None, int | None],
    processes: int = 1,
) -> dict[str, Any]:
    """``processes`` servers on the one database, all pinned to the server core."""
    data = work / label.replace(" ", "-").replace(",", "")
    data.mkdir()
    server = [Path(sys.executable).parent / "recovery-server"]
    subprocess.run(
        server_argv(server, data, database, "init", "--token-file", data / "admin.token"),
        check=True,
        capture_output=True,
    )
    devices = _enroll(database or str(data / "recovery.db"), data, args.devices)
    devices_file = data / "devices.json"
    devices_file.write_text(json.dumps(devices))
    logs = [open(data / f"server-{i}.log", "w") for i in range(processes)]
    procs = [
        subprocess.Popen(
            server_argv(server, data, database, *serve(data / f"port-{i}")),
            stdout=subprocess.DEVNULL,
            stderr=log,
            preexec_fn=_pin(cores[0]),
        )
        for i, log in enumerate(logs)
    ]
    try:
        ports = [_wait_port(data / f"port-{i}", proc) for i, proc in enumerate(procs)]
        urls = ",".join(f"http://127.0.0.1:{port}" for port in ports)
        db_pids = _postgres_pids() if database else None
        result = _client(args, urls, devices_file, [p.pid for p in procs], True, cores[1], db_pids)
        token = (data / "admin.token").read_text().strip()
        counters = [_counters(port, token) for port in ports]
        commits = sum(c.get("qmr_report_commits_total", 0) for c in counters)
        result["per_commit"] = (
            sum(c.get("qmr_reports_committed_total", 0) for c in counters) / commits if commits else None
        )
        transactions = sum(c.get("qmr_store_transactions_total", 0) for c in counters)
        waited = sum(c.get("qmr_store_write_lock_wait_seconds_total", 0) for c in counters)
        result["lock_wait_ms"] = waited / transactions * 1e3 if transactions else None
        return result
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        for log in logs:
            log.close()


def _postgres_pids() -> list[int]:
    """Every PostgreSQL process on this machine (the bench's database is the one that works)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().split(" ", 2)[1] == "(postgres)":
                pids.append(int(stat.parent.name))
        except OSError:
            continue
    return pids


def _counters(port: int, token: str) -> dict[str, float]:
    """The server's own counters from its /metrics: reports per commit (groupcommit.py),
    transactions and the time spent waiting for the write lock (store.py)."""
    import urllib.request

    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return {
            name: float(value)
            for name, _, value in (line.partition(" ") for line in r.read().decode().splitlines())
            if name.startswith(("qmr_report", "qmr_store_"))
        }


def run_floor(
    args: argparse.Namespace, work: Path, cores: tuple[int | None, int | None]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    floor = work / "floor"
    floor.mkdir()
    devices = [
        {
            "device_id": f"bench-{i:05d}",
            "private": (key := SigningKey.generate()).private_pem().decode(),
            "public": public_b64(key.public),
            "template": diagnostics_template(f"bench-{i:05d}").decode(),
        }
        for i in range(min(args.devices, 500))
    ]
    devices_file = floor / "devices.json"
    devices_file.write_text(json.dumps(devices))
    keys_file = floor / "keys.json"
    keys_file.write_text(json.dumps({d["device_id"]: d["public"] for d in devices}))
    results = []
    for role in ("floor", "floor-checks"):
        port_file = floor / f"port-{role}"
        proc = subprocess.Popen(
            [sys.executable, __file__, "--role", role, "--port-file", port_file, "--keys-file", keys_file],
            preexec_fn=_pin(cores[0]),
        )
        try:
            url = f"http://127.0.0.1:{_wait_port(port_file, proc)}"
            if role == "floor":
                results.append(_client(args, url, devices_file, proc.pid, False, cores[1]))
            results.append(_client(args, url, devices_file, proc.pid, True, cores[1]))
        finally:
            proc.terminate()
            proc.wait(30)
    one, two, checked = results
    return one, two, checked


def _postgres_schema(base: str) -> tuple[str, str]:
    import psycopg

    schema = "bench_" + secrets.token_hex(6)
    with psycopg.connect(base, autocommit=True) as c:
        c.execute(f"CREATE SCHEMA {schema}")
    return f"{base}?options=-csearch_path%3D{schema}", schema


def _drop_schema(base: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(base, autocommit=True) as c:
        c.execute(f"DROP SCHEMA {schema} CASCADE")


def _row(label: str, r: dict[str, Any], floor: float | None) -> str:
    def num(v: float | None, fmt: str) -> str:
        return format(v, fmt) if v is not None else "-"

    ratio = f"{r['per_s'] / floor:.2f}" if floor else "-"
    errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or ""
    return (
        f"{label:<30} {r['per_s']:>9.0f} {num(r['server_cpu_us'], '.0f'):>13} {r['server_cpu_share']:>7.0%}"
        f" {num(r['p50_ms'], '.1f'):>7} {num(r['p99_ms'], '.1f'):>7} {r['client_cpu_share']:>7.0%} {ratio:>8}"
        + (f"   errors: {errors}" if errors else "")
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--seconds", type=float, default=10.0, help="measured window per server (after 2 s of warm-up)"
    )
    ap.add_argument("--concurrency", type=int, default=32, help="reports in flight at once")
    ap.add_argument("--devices", type=int, default=4000, help="enrolled devices the reports come from")
    ap.add_argument(
        "--postgres",
        default=os.environ.get("QMR_TEST_POSTGRES"),
        help="PostgreSQL URL (default $QMR_TEST_POSTGRES)",
    )
    ap.add_argument("--only", choices=["floor", "sqlite", "postgresql"], action="append")
    ap.add_argument(
        "--processes",
        type=int,
        default=2,
        help="also run this many servers on the PostgreSQL database, behind the client's round robin",
    )
    # the subprocesses' roles
    ap.add_argument(
        "--role", choices=["main", "floor", "floor-checks", "client"], default="main", help=argparse.SUPPRESS
    )
    ap.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--keys-file", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--devices-file", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--server-pid", help=argparse.SUPPRESS)
    ap.add_argument("--db-pids", default="", help=argparse.SUPPRESS)
    ap.add_argument("--two", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.role in ("floor", "floor-checks"):
        serve_floor(args.port_file, args.keys_file, checks=args.role == "floor-checks")
        return 0
    if args.role == "client":
        result = asyncio.run(
            drive(
                args.url.split(","),
                args.devices_file,
                [int(p) for p in args.server_pid.split(",")],
                args.seconds,
                args.concurrency,
                args.two,
                [int(p) for p in args.db_pids.split(",") if p],
            )
        )
        print(json.dumps(result))
        return 0

    only = set(args.only or ["floor", "sqlite", "postgresql"])
    cpus = sorted(os.sched_getaffinity(0))
    cores: tuple[int | None, int | None] = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)
    print(
        f"bench_ingest: {args.seconds:g} s per server after {WARMUP_S:g} s of warm-up, "
        f"{args.concurrency} reports in flight, {args.devices} devices; "
        + (
            f"server on core {cores[0]}, client on core {cores[1]}"
            if cores[0] is not None
            else "NOT pinned (one core)"
        )
    )
    work = Path(tempfile.mkdtemp(prefix="qmr-bench-ingest-"))
    rows: list[tuple[str, dict[str, Any]]] = []
    floor2: float | None = None
    try:
        if "floor" in only:
            one, two, checked = run_floor(args, work, cores)
            rows += [
                ("floor, 1 request", one),
                ("floor, 2 requests", two),
                ("floor + the checks, 2 req.", checked),
            ]
            floor2 = two["per_s"]
        if "sqlite" in only:
            rows.append(("recovery-server, SQLite", run_server(args, "sqlite", work, None, cores)))
        if "postgresql" in only:
            if not args.postgres:
                print("PostgreSQL: skipped (no --postgres URL; `scripts/postgres.sh start` prints one)")
            else:
                url, schema = _postgres_schema(args.postgres)
                try:
                    rows.append(
                        ("recovery-server, PostgreSQL", run_server(args, "postgresql", work, url, cores))
                    )
                finally:
                    _drop_schema(args.postgres, schema)
                if args.processes > 1:
                    url, schema = _postgres_schema(args.postgres)
                    try:
                        rows.append(
                            (
                                f"... {args.processes} processes",
                                run_server(args, "postgresql-n", work, url, cores, args.processes),
                            )
                        )
                    finally:
                        _drop_schema(args.postgres, schema)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"{'server':<30} {'reports/s':>9} {'CPU-µs/report':>13} {'srv CPU':>7} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'clnt CPU':>7} {'vs floor':>8}"
    )
    for label, r in rows:
        print(_row(label, r, floor2))
    print("(vs floor: reports/s over the two-request floor's; srv/clnt CPU: share of one core)")
    for label, r in rows:
        if r.get("per_commit"):
            print(
                f"{label}: {r['per_commit']:.1f} reports per commit on average (groupcommit.py), "
                f"{r['lock_wait_ms']:.2f} ms waited for the write lock per transaction"
            )
        if r.get("per_process_cpu_us") and len(r["per_process_cpu_us"]) > 1:
            each = ", ".join(f"{x:.0f}" for x in r["per_process_cpu_us"])
            print(f"{label}: CPU-µs per report by process: {each}")
        if r.get("db_cpu_us") is not None:
            print(f"{label}: PostgreSQL's processes: {r['db_cpu_us']:.0f} CPU-µs per report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
