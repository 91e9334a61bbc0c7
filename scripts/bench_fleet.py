#!/usr/bin/env python3
"""Benchmark: a simulated fleet through a staged rollout, on the real service and store.

    .venv/bin/python scripts/bench_fleet.py [--devices 10000] [--store sqlite|PATH|postgresql://...]

Every device signs its enrollment, diagnostics, result and health with its own Ed25519 key
and verifies its directive against the pinned server key (tests/fleetsim.py).
Prints the time of each step and the throughput; nothing is asserted (the tests do that).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recovery_agent.protocol.keys import SigningKey
from recovery_server.access import User, console
from recovery_server.service import RecoveryService
from recovery_server.store import Store
from tests.fleetsim import BAD_PATH, BAD_SHA, FleetSim


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--store", default="sqlite", help="sqlite (a temp file), a path, or a PostgreSQL URL")
    ap.add_argument("--failure-rate", type=float, default=0.02)
    args = ap.parse_args()
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
        {
            "waves": [
                {"name": "canary", "devices": [d.device_id for d in sim.devices[:50]]},
                {"name": "10%", "percent": 10},
                {"name": "100%", "percent": 100},
            ],
            "min_devices": 40,
            "min_success_rate": 0.9,
            "halt_failure_rate": 0.2,
            "halt_min_devices": 40,
        },
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


if __name__ == "__main__":
    sys.exit(main())
