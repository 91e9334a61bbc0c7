"""Encrypted OS disks, the device's side: the escrow made at install (offline, sealed to the
server's escrow key) and delivered by the first health report; and the recovery loop on a
machine whose root is LUKS2: it reports the crash, gets the disk key released for that
report, opens the disk, recovers as on any machine, and locks it again; a refused key needs a
person (exit 12) with nothing changed; a release nobody approves ends the visit as no fix.

The lab's host has no device-mapper, so mapping and mounting the volume is emulated here
(``OsDiskStandIn``: it checks the released key against the real LUKS2 volume with cryptsetup,
then moves the OS tree into place); the QEMU test (tests/test_debian_base.py) does it for real
with dm-crypt in the guest.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from recovery_agent import agent as agent_module
from recovery_agent import luks, osdisk
from recovery_agent.agent import Outcome, RecoveryAgent, report_health
from recovery_agent.bootenv import BootEnv
from recovery_agent.cli import main as agent_main
from recovery_agent.layout import CHANNEL_DIR, ESCROW_PENDING, ESCROW_SENT, QUARANTINE_DIR
from recovery_agent.protocol import sealing
from recovery_server.diskkeys import ReleasePolicy

from .conftest import Fleet, enrolled_settings, escrow_argv, fleet_releasing_keys, running

BAD = "C-00000291-00000000-00000032.sys"
SLOT = 7


def escrow_offline(fleet: Fleet, machine: Path, image: Path, boot_key: Path) -> int:
    """`recovery-agent escrow --escrow-key` as the installer runs it: no server reached."""
    escrow_key = machine / "escrow-key.json"
    escrow_key.write_text(json.dumps(fleet.service.escrow_key()))
    return agent_main(
        escrow_argv(machine, image, boot_key, "--escrow-key", str(escrow_key), "--root", str(machine / "os"))
    )


async def test_the_install_escrow_is_sealed_offline_and_the_first_health_report_delivers_it(
    fleet,
    machine,
    volume,
    capfd,
):
    image, boot_key = volume
    settings = await enrolled_settings(fleet, machine, "dev-0001", os_root="../os")
    code = await asyncio.to_thread(escrow_offline, fleet, machine, image, boot_key)
    out = capfd.readouterr().out
    assert code == 0, out
    pending = machine / "os" / ESCROW_PENDING
    assert pending.is_file() and pending.stat().st_mode & 0o077 == 0
    assert "next health report delivers it" in out
    assert fleet.service.disk_keys(fleet.viewer, "dev-0001").keys == [], "nothing reached the server yet"

    answer = await report_health(settings, "boot-1")
    assert answer["escrow"]
    [dk] = fleet.service.disk_keys(fleet.viewer, "dev-0001").keys
    assert dk.slot == SLOT and not dk.tpm_sealed
    assert not pending.exists() and (machine / "os" / ESCROW_SENT).is_file()
    # The next health report has nothing more to deliver.
    assert "escrow" not in await report_health(settings, "boot-2")


class OsDiskStandIn:
    """``osdisk.open_os``/``close_os`` where no device-mapper exists (an emulation): the key
    must open QMR's keyslot of the real LUKS2 volume (cryptsetup --test-passphrase); "opening"
    moves the OS tree, kept aside while locked, to the mount point; closing moves it back."""

    def __init__(self, image: Path, sealed: Path) -> None:
        self.image, self.sealed = image, sealed
        self.opened: list[bool] = []
        self.closed = 0

    def open_os(self, enc: osdisk.EncryptedOs, key: bytearray, os_root: Path) -> Path:
        try:
            ok = luks.check_key(self.image, key, slot=SLOT)
        finally:
            sealing.wipe(key)
        self.opened.append(ok)
        if not ok:
            raise luks.LuksError(f"cryptsetup could not open {enc.volume} (exit 2): No key available")
        os_root.rmdir()
        self.sealed.rename(os_root)
        return Path("/dev/mapper") / enc.mapper

    def close_os(self, enc: osdisk.EncryptedOs, os_root: Path) -> list[str]:
        self.closed += 1
        if os_root.exists() and not self.sealed.exists():
            os_root.rename(self.sealed)
            os_root.mkdir()
        return []


async def locked_machine(fleet: Fleet, machine: Path, volume, monkeypatch, clock, **overrides):
    """A broken machine (channel-file) whose OS root is locked: its tree is kept aside, the
    mount point is empty; the escrow the install made is delivered by a healthy boot's report
    (before the bad update); the agent to run, on ``clock`` (it stands still until the test
    moves it: no deadline passes on a slow machine)."""
    image, boot_key = volume
    settings = await enrolled_settings(fleet, machine, "dev-0001", max_recovery_attempts=3, **overrides)
    assert await asyncio.to_thread(escrow_offline, fleet, machine, image, boot_key) == 0
    assert (await report_health(settings.model_copy(update={"pstore_dir": None}), "b0"))["escrow"]
    sealed = machine / "os.locked"
    (machine / "os").rename(sealed)
    (machine / "os").mkdir()
    env = BootEnv.read(machine / "esp/grub/grubenv")
    env.set("boot_count", "2")  # (the healthy boot's report reset it; then two failed boots)
    env.write(machine / "esp/grub/grubenv")
    stand_in = OsDiskStandIn(image, sealed)
    monkeypatch.setattr(agent_module.osdisk, "open_os", stand_in.open_os)
    monkeypatch.setattr(agent_module.osdisk, "close_os", stand_in.close_os)
    lines: list[str] = []
    agent = RecoveryAgent(
        settings,
        timeline=agent_module.Timeline(sink=lines.append),
        encrypted_os=osdisk.EncryptedOs(volume=image, boot=machine / "esp"),
        clock=clock,
    )
    return agent, stand_in, sealed, lines


@pytest.fixture
async def encrypted(fleet, machine, volume, monkeypatch, clock):
    return await locked_machine(fleet, machine, volume, monkeypatch, clock)


async def wait_for(fleet: Fleet, kind: str, n: int = 1) -> list[dict]:
    while True:
        found = [e for e in fleet.service.events(fleet.admin) if e.kind == kind]
        if len(found) >= n:
            return found
        await asyncio.sleep(0.05)


async def test_an_encrypted_machine_is_recovered_once_a_person_releases_its_key(
    fleet, encrypted, machine, clock
):
    agent, stand_in, sealed, lines = encrypted

    async def people() -> None:
        [requested] = await wait_for(fleet, "disk_key.requested")
        fleet.service.decide_key_release(fleet.user("alice"), requested.subject, True)
        await clock.wait_for_sleeper()  # the agent waits to ask again: let it
        await clock.advance(agent.s.retry_interval_s)
        reports = await wait_for(fleet, "diagnostics.received", 2)  # the crash, then the full report
        fleet.approve_suggested(json.loads(reports[-1].detail)["incident"])
        await clock.release()

    helpers = asyncio.create_task(people())
    outcome = await asyncio.wait_for(agent.run(), 60)
    await helpers
    text = "\n".join(lines)
    assert outcome is Outcome.REMEDIATED, text
    assert stand_in.opened == [True] and stand_in.closed == 1
    # The first report (locked disk) had no inventory; the second has the channel files.
    payloads = [
        json.loads(r["payload"]) for r in fleet.store.all("SELECT payload FROM reports ORDER BY received_at")
    ]
    assert len(payloads) == 2
    assert payloads[0]["channel_files"] == [] and any(
        "encrypted and still locked" in n for n in payloads[0]["notes"]
    )
    assert any(f["path"].endswith(BAD) for f in payloads[1]["channel_files"])
    # The fix went to the disk that was opened, and the disk is locked again.
    assert not (sealed / CHANNEL_DIR / BAD).exists()
    assert any((sealed / QUARANTINE_DIR).rglob(f"*-{BAD}"))
    assert list((machine / "os").iterdir()) == []
    kinds = [e.kind for e in fleet.service.events(fleet.admin) if e.kind.startswith("disk_key.")]
    assert kinds[-3:] == ["disk_key.requested", "disk_key.release_approved", "disk_key.released"]
    assert "released the disk key" in text and "wiped" in text


async def test_a_refused_key_needs_a_person_and_changes_nothing(fleet, encrypted, machine, clock):
    agent, stand_in, sealed, lines = encrypted
    before = sorted(p.relative_to(sealed) for p in sealed.rglob("*"))

    async def refuse() -> None:
        [requested] = await wait_for(fleet, "disk_key.requested")
        fleet.service.decide_key_release(fleet.user("alice"), requested.subject, False)
        await clock.release()  # its next ask is refused

    refusing = asyncio.create_task(refuse())
    outcome = await asyncio.wait_for(agent.run(), 60)
    await refusing
    assert outcome is Outcome.NEEDS_MANUAL and int(outcome) == 12
    assert stand_in.opened == [] and stand_in.closed == 0
    assert sorted(p.relative_to(sealed) for p in sealed.rglob("*")) == before
    assert "needs a person" in "\n".join(lines)


async def test_nobody_approves_the_release_the_agent_asks_until_its_time_to_reboot(
    fleet, machine, volume, monkeypatch, clock
):
    agent, stand_in, sealed, lines = await locked_machine(
        fleet, machine, volume, monkeypatch, clock, retry_interval_min=20, time_to_reboot_min=60
    )
    await clock.release()  # agent time runs freely: its deadline passes with nobody approving
    outcome = await asyncio.wait_for(agent.run(), 60)
    text = "\n".join(lines)
    assert outcome is Outcome.NO_REMEDIATION, text
    assert text.count("waits for a person to approve it") >= 2, text
    assert stand_in.opened == []
    env = BootEnv.read(machine / "esp/grub/grubenv")
    assert env.get("boot_count") == "0", "the OS gets another try, as with no fix"


async def test_the_policy_off_refuses_and_the_machine_needs_a_person(
    store_url, machine, volume, monkeypatch, clock
):
    async with running(fleet_releasing_keys(store_url, ReleasePolicy(mode="off"))) as fleet:
        agent, stand_in, _, lines = await locked_machine(fleet, machine, volume, monkeypatch, clock)
        outcome = await asyncio.wait_for(agent.run(), 60)
        assert outcome is Outcome.NEEDS_MANUAL, "\n".join(lines)
        assert stand_in.opened == []
        assert "policy" in "\n".join(lines)


async def test_a_rotation_adds_the_new_key_in_a_free_slot_and_removes_the_old_once_escrowed(
    fleet, machine, volume, capfd
):
    """`recovery-agent escrow --rotate`: the previous escrow's slot (recorded on the machine)
    goes only after the server holds the new key, which then opens its new slot."""
    from recovery_agent.protocol.keys import SigningKey

    from .test_disk_keys import fetch
    from .test_server import report

    image, boot_key = volume
    settings = await enrolled_settings(fleet, machine, "dev-0001", os_root="../os")
    base = escrow_argv(machine, image, boot_key, "--root", str(machine / "os"), "--tpm-sealed")
    assert await asyncio.to_thread(agent_main, base) == 0
    assert luks.used_slots(image) == {0, SLOT}
    [first] = fleet.service.disk_keys(fleet.viewer, "dev-0001").keys
    assert await asyncio.to_thread(agent_main, [*base, "--rotate"]) == 0
    out = capfd.readouterr().out
    assert "rotated: keyslot 7 (the previous recovery key) removed" in out, out
    assert luks.used_slots(image) == {0, 31}
    keys = {k.key_id: k for k in fleet.service.disk_keys(fleet.viewer, "dev-0001").keys}
    assert keys[first.key_id].state == "rotated"
    [new] = [k for k in keys.values() if k.state == "active"]
    assert new.slot == 31
    key = SigningKey.load(settings.device_key)
    _, receipt = await report(fleet, "dev-0001", key)
    got = await fetch(fleet, "dev-0001", key, receipt.report_id)  # (TPM-sealed: no person)
    assert got is not None and luks.check_key(image, got, slot=31)
    sealing.wipe(got)


def test_the_install_finds_a_luks_root_and_refuses_without_its_keys(tmp_path):
    """What `recovery-agent install` asks of a running machine whose root is on LUKS2 (its
    tools answered by a stand-in: this host's root is not encrypted), and what it refuses."""
    from recovery_agent.install import InstallOptions, InstallRefused, _check_luks_options
    from recovery_agent.install.target import Target

    answers = {
        "findmnt": "/dev/mapper/qmr_root\n",
        "cryptsetup status": "/dev/mapper/qmr_root is active and is in use.\n  type:    LUKS2\n"
        "  cipher:  aes-xts-plain64\n  device:  /dev/vda2\n",
        "cryptsetup luksUUID": "51a2c0de-de12-4000-8000-0000000000c2\n",
    }

    def runner(argv: list[str], env: dict[str, str]) -> str:
        key = argv[0] if argv[0] != "cryptsetup" else " ".join(argv[:2])
        return answers[key]

    found = Target(Path("/"), runner).luks_root()
    assert found is not None
    assert (found.device, found.uuid, found.mapper) == (
        "/dev/vda2",
        "51a2c0de-de12-4000-8000-0000000000c2",
        "qmr_root",
    )
    answers["findmnt"] = "/dev/vda2\n"
    assert Target(Path("/"), runner).luks_root() is None, "a root on a plain partition"
    with pytest.raises(InstallRefused, match="--luks-unlock-key-file FILE .* and --escrow-key FILE"):
        _check_luks_options(InstallOptions(), found)
    key = tmp_path / "k"
    key.write_bytes(b"the machine's key")
    with pytest.raises(InstallRefused, match="--escrow-key .*: no such file"):
        _check_luks_options(InstallOptions(luks_unlock_key_file=key, escrow_key=tmp_path / "e"), found)


async def test_a_recovery_test_the_server_asked_for_opens_the_encrypted_disk_and_boots_back(
    fleet, encrypted, machine, clock
):
    """Test mode on an encrypted machine: the test's report asks for the key (released, as for
    a crash, for a test an operator asked for), the disk is opened, the test directive writes
    its record on it, the disk is closed and the machine goes back to the OS."""
    from recovery_agent import testmode
    from recovery_agent.layout import RECOVERY_TESTS_DIR

    agent, stand_in, sealed, lines = encrypted
    grubenv = machine / "esp/grub/grubenv"
    env = BootEnv.read(grubenv)
    env.set("boot_count", "0")  # a healthy machine
    env.write(grubenv)
    fleet.service.request_recovery_test(fleet.user("oscar"), "dev-0001")
    testmode.arm(grubenv, testmode.SERVER)

    async def approve() -> None:
        [requested] = await wait_for(fleet, "disk_key.requested")
        fleet.service.decide_key_release(fleet.user("alice"), requested.subject, True)
        await clock.release()

    approving = asyncio.create_task(approve())
    outcome = await asyncio.wait_for(agent.run(), 60)
    await approving
    text = "\n".join(lines)
    assert outcome is Outcome.REMEDIATED, text
    assert stand_in.opened == [True] and stand_in.closed == 1
    [record] = (sealed / RECOVERY_TESTS_DIR).iterdir()
    assert record.name.startswith("rt-")
    assert fleet.count("reports") == 0, "a test opens no incident"
    assert testmode.armed(grubenv) is None and BootEnv.read(grubenv).get("boot_count") == "0"


async def test_a_test_the_device_armed_itself_gets_no_key_and_boots_back(fleet, encrypted, machine):
    from recovery_agent import testmode

    agent, stand_in, sealed, lines = encrypted
    before = sorted(p.relative_to(sealed) for p in sealed.rglob("*"))
    grubenv = machine / "esp/grub/grubenv"
    env = BootEnv.read(grubenv)
    env.set("boot_count", "0")
    env.write(grubenv)
    testmode.arm(grubenv, testmode.LOCAL)
    outcome = await asyncio.wait_for(agent.run(), 60)
    text = "\n".join(lines)
    assert outcome is Outcome.NO_REMEDIATION, text
    assert "recovery test FAILED" in text and "nor a recovery test the server asked for" in text
    assert stand_in.opened == []
    assert sorted(p.relative_to(sealed) for p in sealed.rglob("*")) == before
    assert testmode.armed(grubenv) is None and BootEnv.read(grubenv).get("boot_count") == "0"
