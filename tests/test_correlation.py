"""Finding the culprit of an incident nobody recognises (recovery_server/correlation.py): the
exact test against an independent computation, and a simulated fleet over the real HTTP API
whose culprit is on most crashing devices, on some healthy ones, among decoys."""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
from fractions import Fraction

import pytest

from recovery_agent.protocol.admin import AdminClient
from recovery_agent.protocol.client import DeviceClient
from recovery_agent.protocol.keys import key_id
from recovery_agent.protocol.wire import CrashKind, CrashSignature, FileRecord
from recovery_server.correlation import Table

from .conftest import FAST_RETRY
from .fleetsim import HttpDevice
from .test_enrollment import admin

CHANNELS = "var/lib/sensor/channels"
# The sensor crashes on a channel file without saying which (no channel_file in the signature).
SILENT = CrashSignature(
    kind=CrashKind.KERNEL_PANIC,
    title="general protection fault in sensor_parse_channel",
    guilty_module="sensor",
    guilty_frame="sensor_parse_channel",
)


def exact_tail(a: int, n1: int, c: int, n2: int) -> Fraction:
    """P(X >= a), X hypergeometric, summed in exact fractions: the definition, term by term."""
    big_n, k = n1 + n2, a + c
    total = sum(
        (Fraction(math.comb(k, x) * math.comb(big_n - k, n1 - x)) for x in range(a, min(k, n1) + 1)),
        Fraction(0),
    )
    return total / math.comb(big_n, n1)


@pytest.mark.parametrize(
    "a, n1, c, n2",
    [(8, 10, 1, 20), (40, 50, 8, 100), (45, 50, 90, 100), (50, 50, 100, 100), (0, 10, 3, 10), (3, 3, 0, 0)],
)
def test_the_exact_test_matches_its_definition(a, n1, c, n2):
    got = math.exp(Table(a, n1, c, n2).log_p_value())
    assert got == pytest.approx(float(exact_tail(a, n1, c, n2)), rel=1e-9)


def test_a_culprit_far_beyond_floating_point_still_ranks_by_its_logarithm():
    huge = Table(8000, 10000, 500, 90000).log_p_value()
    large = Table(800, 1000, 50, 9000).log_p_value()
    assert huge < large < math.log(1e-300)  # both below what a float p-value can hold


def file(name: str, content: str) -> FileRecord:
    return FileRecord(
        path=f"{CHANNELS}/{name}",
        size=len(content),
        mtime=0,
        sha256=hashlib.sha256(content.encode()).hexdigest(),
    )


CULPRIT = file("C-00000291-00000000-00000033.sys", "bad content")
COMMON = [file(f"C-0000010{i}-00000000-00000001.sys", f"everyone {i}") for i in range(4)]
DECOY_NEW = file("C-00000500-00000000-00000002.sys", "new decoy")  # changed today on ~90% of all
DECOY_OLD = file("C-00000500-00000000-00000002.sys", "old decoy")
OTHER_REASON = file("C-00000700-00000000-00000001.sys", "another crash's file")


async def silent_fleet(fleet) -> tuple[str, list[HttpDevice]]:
    """Over HTTP: 50 devices crash the silent way, 40 with the culprit and 10 for another
    reason; 100 healthy devices send their inventories, 8 of them got the culprit and have not
    rebooted since; a decoy changed on about 90% of all; four files everyone has. Returns the
    incident and the crashing devices (their client closed)."""
    rng = random.Random(7)

    def fleet_files(has_culprit: bool, has_other: bool = False) -> list[FileRecord]:
        files = [*COMMON, DECOY_NEW if rng.random() < 0.9 else DECOY_OLD]
        if has_culprit:
            files.append(CULPRIT)
        if has_other:
            files.append(OTHER_REASON)
        return files

    ring = {key_id(fleet.key.public): fleet.key.public}
    async with DeviceClient(fleet.url, retry=FAST_RETRY) as client:
        crashing = [
            HttpDevice(f"crash-{i:03d}", client, ring, files=fleet_files(i < 40, i >= 40), crash=SILENT)
            for i in range(50)
        ]
        healthy = [HttpDevice(f"ok-{i:03d}", client, ring, files=fleet_files(i < 8)) for i in range(100)]
        token = fleet.enrollment_token
        await asyncio.gather(*(d.enroll(token) for d in crashing + healthy))
        answers = await asyncio.gather(*(d.healthy() for d in healthy))
        assert {a["inventory"] for a in answers} == {"stored"}
        receipts = await asyncio.gather(*(d.report() for d in crashing))
    incident = receipts[0].incident_id
    assert {r.incident_id for r in receipts} == {incident}
    return incident, crashing


async def test_a_silent_crash_names_the_file_its_devices_have_and_healthy_ones_do_not(fleet):
    incident, crashing = await silent_fleet(fleet)
    culprit, decoy_new, decoy_old, common = CULPRIT, DECOY_NEW, DECOY_OLD, COMMON

    async with AdminClient(fleet.url, fleet.service.create_user(fleet.admin, "ann", "operator").token) as c:
        corr = await c.correlation(incident)
        suggestion = await c.suggestion(incident)
    assert (corr.crashing_devices, corr.healthy_devices) == (50, 100)
    top = corr.candidates[0]
    assert (top.path, top.sha256) == (culprit.path, culprit.sha256)
    assert (top.crashing, top.healthy) == (40, 8)
    assert top.crashing_share == 0.8 and top.healthy_share == 0.08
    assert top.p_value < 1e-15 and top.odds_ratio > 20
    assert top.onset_before_s is not None and top.onset_before_s >= 0  # seen before the first report
    ranks = {(c.path, c.sha256): i for i, c in enumerate(corr.candidates)}
    for decoy in (decoy_new, decoy_old, *common):
        assert ranks[(decoy.path, decoy.sha256)] > 0, decoy.path
    for everyone in common:  # every device has it: nothing to learn
        assert corr.candidates[ranks[(everyone.path, everyone.sha256)]].p_value == 1.0

    # No known fix for a silent crash: the draft names the culprit's content, with the evidence.
    assert [a.model_dump() for a in suggestion.actions] == [
        {"type": "quarantine_file", "path": culprit.path, "sha256": culprit.sha256}
    ]
    assert "on 40 of 50 devices of the incident (80%) against 8 of 100 healthy" in suggestion.why[0]
    # Approved, it is served to the devices that have that content, and to no other.
    fleet.approve_suggested(incident)
    async with DeviceClient(fleet.url, retry=FAST_RETRY) as client:
        for d in crashing:
            d.client = client
        served = await asyncio.gather(*(d.poll() for d in crashing))
    assert [s is not None for s in served] == [i < 40 for i in range(50)]

    # The same table from the command line.
    token = fleet.service.create_user(fleet.admin, "cli", "viewer").token
    code, out, err = await admin(fleet, token, "incidents", incident, "--why")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"{incident}: files of its 50 devices against 100 healthy devices")
    first_row = next(line for line in lines if line.startswith("1 "))
    assert culprit.path in first_row and "40/50 (80%)" in first_row and "8/100 (8%)" in first_row


async def test_why_needs_an_incident_and_names_an_unknown_one(fleet):
    token = fleet.service.create_user(fleet.admin, "cli", "viewer").token
    code, _, err = await admin(fleet, token, "incidents", "--why")
    assert code != 0 and "--why needs an incident" in err
    code, _, err = await admin(fleet, token, "incidents", "INC-nope", "--why")
    assert code != 0 and "INC-nope" in err


async def test_the_labs_simulated_fleet_makes_the_update_stand_out(fleet):
    """recovery_lab/fleet.py, which surrounds the lab's QEMU machine with simulated devices,
    without the machine: a report of the silent crash stands in for it."""
    from recovery_agent.protocol.envelope import seal_bytes
    from recovery_agent.protocol.keys import SigningKey
    from recovery_lab.fleet import surround

    from .fleetsim import BAD_FILE, crash_report

    key = SigningKey.generate()
    await fleet.enroll("lab-machine", key)
    machine = crash_report(
        "lab-machine",
        fleet.service.challenge("lab-machine").nonce,
        "m" * 32,
        crash=SILENT,
        files=[file("C-00000290-00000000-00000007.sys", "good 290"), BAD_FILE],
    )
    receipt = fleet.service.accept_diagnostics(seal_bytes(machine, key))
    summary = await surround(fleet.url, fleet.enrollment_token, machine, {BAD_FILE.path}, 60)
    assert (summary.devices, summary.crashing, summary.healthy) == (60, 20, 40)
    assert summary.update == [f"{BAD_FILE.path} {BAD_FILE.sha256}"]
    corr = fleet.service.correlation(fleet.viewer, receipt.incident_id)
    assert corr.crashing_devices == 21 and corr.healthy_devices == 40
    top = corr.candidates[0]
    assert (top.path, top.sha256) == (BAD_FILE.path, BAD_FILE.sha256)
