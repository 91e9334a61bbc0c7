"""A simulated fleet around the lab's machine (``recovery-lab run --fleet N``): so that one
QEMU machine can show what only a fleet shows, the correlation of files (correlation.py) that
finds the culprit of a crash the catalog does not know.

It is an emulation, named as one: N devices, each its own key, enrolled and speaking the real
protocol over HTTP to the run's server, but no machines. When the lab's machine reports its
first crash, they are made from that report, the way a fleet that got one content update
looks:

- The **update** is what the scenario added or replaced among the files the report lists (for
  ``silent-channel-file``, the bad channel file). Every simulated device runs the machine's
  other listed files (its drivers, channel files, driver store).
- A third of them **crash** the same way as the machine (its crash signature, so the same
  incident): 80% of those have the update; the others crash for another reason and have
  another new file instead.
- Two thirds are **healthy** and send their inventory with a health report; 8% of them got the
  update and have not rebooted since.
- A **decoy**: another content that changed on about 90% of every group (a routine update),
  and files every device has (the machine's own).

What it leaves out: time (every device acts at once) and devices that come and go.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import secrets
from dataclasses import dataclass
from typing import Any

from recovery_agent.layout import CHANNEL_DIR
from recovery_agent.protocol.client import DeviceClient
from recovery_agent.protocol.envelope import seal_bytes
from recovery_agent.protocol.keys import SigningKey, public_b64
from recovery_agent.protocol.wire import (
    Diagnostics,
    Enrollment,
    FileRecord,
    Health,
    InventoryUpdate,
    inventory_digest,
    utcnow,
)

CRASHING_SHARE = 1 / 3
UPDATE_AMONG_CRASHING = 0.8
UPDATE_AMONG_HEALTHY = 0.08
DECOY_SHARE = 0.9
# Devices enrolled and reporting at once (the server's connections are not the point here).
CONCURRENCY = 32


def _record(name: str, content: str) -> FileRecord:
    data = content.encode()
    return FileRecord(
        path=f"{CHANNEL_DIR}/{name}", size=len(data), mtime=0, sha256=hashlib.sha256(data).hexdigest()
    )


DECOY_NEW = _record("C-00000500-00000000-00000002.sys", "the routine update, new")
DECOY_OLD = _record("C-00000500-00000000-00000002.sys", "the routine update, old")
OTHER_CRASH = _record("C-00000700-00000000-00000001.sys", "another crash's file")


@dataclass
class FleetSummary:
    """What the simulated fleet did (the run report's ``fleet``)."""

    devices: int
    crashing: int
    healthy: int
    update: list[str]  # "path sha256" of the scenario's update, as the machine reported it

    def to_json(self) -> dict[str, Any]:
        return {
            "devices": self.devices,
            "crashing": self.crashing,
            "healthy": self.healthy,
            "update": self.update,
        }


async def surround(
    url: str, enrollment_token: str, machine: Diagnostics, updated_paths: set[str], n: int, seed: int = 291
) -> FleetSummary:
    """Make ``n`` simulated devices from the machine's first report ``machine`` and have them
    enroll, report their health (the healthy ones) or the same crash (the crashing ones) over
    HTTP at ``url``. ``updated_paths``: the paths the scenario added or replaced."""
    rng = random.Random(seed)
    kinds = {
        "drivers": machine.drivers,
        "channel_files": machine.channel_files,
        "driver_store": machine.driver_store,
    }
    update = {kind: [r for r in rs if r.path in updated_paths] for kind, rs in kinds.items()}
    base = {kind: [r for r in rs if r.path not in updated_paths] for kind, rs in kinds.items()}
    crashing = round(n * CRASHING_SHARE)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(client: DeviceClient, i: int) -> None:
        crash = i < crashing
        share = UPDATE_AMONG_CRASHING if crash else UPDATE_AMONG_HEALTHY
        files = {kind: list(rs) for kind, rs in base.items()}
        files["channel_files"].append(DECOY_NEW if rng.random() < DECOY_SHARE else DECOY_OLD)
        if rng.random() < share:
            for kind, rs in update.items():
                files[kind] += rs
        elif crash:
            files["channel_files"].append(OTHER_CRASH)
        device_id = f"sim-{'crash' if crash else 'ok'}-{i:05d}"
        key = SigningKey.generate()
        async with gate:
            enroll = Enrollment(
                device_id=device_id,
                public_key=public_b64(key.public),
                enrollment_token=enrollment_token,
                created_at=utcnow(),
            )
            await client.enroll(seal_bytes(enroll, key))
            if not crash:
                every = [f for rs in files.values() for f in rs]
                inventory = InventoryUpdate(
                    digest=inventory_digest((f.path, f.sha256) for f in every), files=every
                )
                health = Health(
                    device_id=device_id,
                    boot_id=secrets.token_hex(8),
                    created_at=utcnow(),
                    inventory=inventory,
                )
                await client.send_health(seal_bytes(health, key))
                return
            ch = await client.challenge(device_id)
            report = Diagnostics(
                device_id=device_id,
                server_nonce=ch.nonce,
                agent_nonce=secrets.token_urlsafe(24),
                created_at=utcnow(),
                agent_version="lab-fleet",
                boot=machine.boot,
                crash=machine.crash,
                system=machine.system,
                drivers=files["drivers"],
                channel_files=files["channel_files"],
                driver_store=files["driver_store"],
            )
            await client.send_diagnostics(seal_bytes(report, key))

    async with DeviceClient(url) as client:
        await asyncio.gather(*(one(client, i) for i in range(n)))
    return FleetSummary(
        devices=n,
        crashing=crashing,
        healthy=n - crashing,
        update=[f"{r.path} {r.sha256}" for rs in update.values() for r in rs],
    )
