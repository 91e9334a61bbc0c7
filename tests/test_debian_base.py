"""The lab on stock Debian 12 (recovery_lab/build/debian.py).

Without a VM: a scenario's fault is put on an installed image's root partition with debugfs
(no mount, no root). With QEMU (marked ``qemu`` and ``slow``: the first build runs mmdebstrap
and a provisioning boot, many minutes under TCG; later runs share the cached image): the
whole loop on Debian, installed by ``recovery-agent install``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pytest

from recovery_agent.digest import sha256_bytes, sha256_file
from recovery_lab import disk
from recovery_lab.build import debian
from recovery_lab.build.cache import Cache
from recovery_lab.build.osroot import channel_file
from recovery_lab.inspect import DiskImage
from recovery_lab.loop import RunOptions, run_async
from recovery_lab.runreport import RunReport, render
from recovery_lab.scenario import ScenarioError, load_scenario

REPO = Path(__file__).resolve().parent.parent
BAD = "C-00000291-00000000-00000032.sys"
GOOD = ["C-00000290-00000000-00000007.sys", "C-00000291-00000000-00000031.sys"]
RELEASE = "6.1.0-57-amd64"

needs_e2fs = pytest.mark.skipif(
    not (
        shutil.which("mkfs.ext4", path="/usr/sbin:/sbin") and shutil.which("debugfs", path="/usr/sbin:/sbin")
    ),
    reason="needs e2fsprogs",
)


def _provisioned(tmp_path: Path) -> Path:
    """A stand-in for the debian-qmr stage: the base's layout, a root with the sensor's files."""
    out = tmp_path / "debian-qmr-test"
    root = tmp_path / "rootfs"
    for name in GOOD:
        p = root / "var/lib/sensor/channels" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(channel_file("channel:good-291"))
    ko = root / f"lib/modules/{RELEASE}/extra/sensor.ko"
    ko.parent.mkdir(parents=True)
    ko.write_bytes(b"sensor 1.0")
    (tmp_path / "bootfs").mkdir()
    out.mkdir()
    images = {debian.BOOT_PART: tmp_path / "boot.ext4", debian.ROOT_PART: tmp_path / "root.ext4"}
    debian.mkfs_ext4(tmp_path / "bootfs", images[1], 512, debian.BOOT_UUID, "boot")
    debian.mkfs_ext4(root, images[2], 3072, debian.ROOT_UUID, "root")
    disk.assemble(out / "disk.img", disk.layout(debian.PARTITIONS), images, None, None)
    return out


@needs_e2fs
def test_a_scenario_fault_goes_onto_the_installed_images_root_partition(tmp_path: Path) -> None:
    provisioned = _provisioned(tmp_path)
    sensor_dir = tmp_path / "sensor"
    (sensor_dir / "2.0").mkdir(parents=True)
    (sensor_dir / "2.0/sensor.ko").write_bytes(b"sensor 2.0")
    cache = Cache(tmp_path / "cache", log=lambda _: None)
    scenario = load_scenario(REPO / "images/scenarios/channel-file.toml")
    out = debian.stage_scenario_disk(cache, provisioned, scenario, sensor_dir, RELEASE)
    with DiskImage(out / "disk.img") as d:
        assert sorted(d.ext4_listdir(debian.ROOT_PART, "var/lib/sensor/channels")) == sorted([BAD, *GOOD])
        assert d.ext4_file(debian.ROOT_PART, f"var/lib/sensor/channels/{BAD}") == channel_file(
            "channel:bad-291"
        )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base"] == "debian" and manifest["scenario"] == "channel-file"
    # bad-driver replaces the driver at the kernel's release; the provisioned image is untouched.
    bad = load_scenario(REPO / "images/scenarios/bad-driver.toml")
    out = debian.stage_scenario_disk(cache, provisioned, bad, sensor_dir, RELEASE)
    with DiskImage(out / "disk.img") as d:
        assert d.ext4_file(debian.ROOT_PART, f"lib/modules/{RELEASE}/extra/sensor.ko") == b"sensor 2.0"
    with DiskImage(provisioned / "disk.img") as d:
        assert d.ext4_file(debian.ROOT_PART, f"lib/modules/{RELEASE}/extra/sensor.ko") == b"sensor 1.0"
        assert BAD not in d.ext4_listdir(debian.ROOT_PART, "var/lib/sensor/channels")


@needs_e2fs
def test_the_lab_writes_and_reads_the_data_area_as_dm_crypt_does(tmp_path):
    """recovery_lab.build.luksimage: cryptsetup's header with the lab's volume key; the data
    area written and read back; the machine's key opens the keyslot."""
    import base64
    import subprocess

    from recovery_agent import luks
    from recovery_lab.build import luksimage

    if shutil.which("cryptsetup") is None and not Path("/usr/sbin/cryptsetup").exists():
        pytest.fail("cryptsetup is missing: scripts/setup.sh --test installs Debian's cryptsetup-bin")
    volume_key, unlock = os.urandom(64), os.urandom(32)
    vol, plain, back = tmp_path / "v.img", tmp_path / "p.img", tmp_path / "q.img"
    luksimage.format_luks(vol, 20, "51a2c0de-de12-4000-8000-00000000ffff", unlock, volume_key, tmp_path)
    plain.write_bytes(os.urandom(1 << 20) + bytes(2 << 20) + os.urandom(700 * 512))
    with open(plain, "r+b") as f:
        f.truncate(4 << 20)
    luksimage.encrypt_into(plain, vol, volume_key)
    data = vol.read_bytes()[luksimage.DATA_OFFSET :]
    assert data[: 1 << 20] != plain.read_bytes()[: 1 << 20], "encrypted"
    assert data[(1 << 20) : (2 << 20)] != bytes(1 << 20), "zeros are encrypted too"
    luksimage.decrypt_to(vol, 0, vol.stat().st_size, volume_key, back)
    assert back.read_bytes()[: 4 << 20] == plain.read_bytes()
    dump = subprocess.run(
        ["cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode", "--key-file", "-", str(vol)],
        input=unlock,
        capture_output=True,
        check=True,
    ).stdout.decode()
    hexkey = "".join(dump.split("MK dump:")[1].split()) if "MK dump:" in dump else ""
    assert hexkey.startswith(volume_key.hex()[:32]), dump
    info = subprocess.run(
        ["cryptsetup", "luksDump", str(vol)], capture_output=True, check=True
    ).stdout.decode()
    assert f"offset: {luksimage.DATA_OFFSET} [bytes]" in info and "aes-xts-plain64" in info
    assert luks.check_key(vol, unlock)
    assert base64.b64encode(volume_key) not in vol.read_bytes()


def test_a_scenario_the_debian_base_cannot_build_is_refused_by_name(tmp_path: Path) -> None:
    provisioned = _provisioned(tmp_path)
    cache = Cache(tmp_path / "cache", log=lambda _: None)
    with pytest.raises(ScenarioError, match="kernel_args are not supported on the Debian base"):
        debian.stage_scenario_disk(
            cache, provisioned, load_scenario(REPO / "images/scenarios/unknown.toml"), tmp_path, RELEASE
        )
    mine = tmp_path / "mine.toml"
    mine.write_text(
        'name = "mine"\ndescription = "x"\n[[files]]\npath = "var/lib/sensor/channels/'
        + GOOD[0]
        + '"\naction = "add"\ncontent = "x"\n[expect]\nends_in = "recovery"\n'
    )
    with pytest.raises(ScenarioError, match="already exists in the image: use replace"):
        debian.stage_scenario_disk(cache, provisioned, load_scenario(mine), tmp_path, RELEASE)


# --------------------------------------------------------------------------- in QEMU

can_build = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mmdebstrap") is None,
    reason="the Debian base needs root and mmdebstrap (apt-get install mmdebstrap)",
)

# Files of ours anywhere in the image; each must be in the installer's manifest (the lab
# places none of them).
OURS = (
    "etc/grub.d/45_qmr",
    "etc/default/grub.d/qmr.cfg",
    "etc/modules-load.d/00-qmr-pstore.conf",
    "etc/kernel/postinst.d/zz-qmr-recovery",
    "etc/kernel/postrm.d/zz-qmr-recovery",
    "etc/systemd/system/qmr-health-check.service",
    "etc/systemd/system/qmr-mark-good.service",
    "etc/systemd/system/qmr-health-report.service",
    "etc/recovery/agent.json",
    "etc/recovery/recovery.json",
    "etc/recovery/device.key",
    "usr/local/sbin/recovery-agent",
    "opt/qmr",
    "boot/qmr",
)


# What a boot of the stock image changes on its own, left out of the file-by-file comparison:
# systemd's journal and random seed, the login records, and the crash records of the failed
# boots that systemd-pstore moved out of /sys/fs/pstore.
NORMAL_BOOT_CHANGES = (
    "var/log/journal/",
    "var/log/wtmp",
    "var/lib/systemd/random-seed",
    "var/lib/systemd/pstore/",
)


def tree_digest(image: Path, part: int, dest: Path) -> dict[str, str]:
    """Every path on a partition -> its sha256, ``dir``, or ``-> target`` for a symlink."""
    with DiskImage(image) as d:
        root = d.ext4_rdump(part, dest)
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = sha256_file(p)
    shutil.rmtree(root)
    return out


async def recovered_run(tmp_path: Path, scenario: str, **options: object) -> RunReport:
    """The whole loop on the Debian base, kept in ``tmp_path/run``; fails with the run's last
    lines unless the machine recovered."""
    lines: list[str] = []
    opts = RunOptions(
        scenario=scenario,
        auto_approve=True,
        base="debian",
        timeout_s=2400,
        workdir=tmp_path / "run",
        keep=True,
        log=lines.append,
        **options,
    )
    report = await run_async(opts)
    assert report.recovered, "\n".join(lines[-60:]) + render(report)
    return report


@pytest.mark.qemu
@pytest.mark.slow
@can_build
@pytest.mark.timeout(7200)
@pytest.mark.parametrize("firmware", ["bios", "uefi"])
async def test_channel_file_on_stock_debian_is_recovered_end_to_end(tmp_path: Path, firmware: str) -> None:
    report = await recovered_run(tmp_path, "channel-file", firmware=firmware)
    assert report.problems == []
    d = report.disk
    assert sorted(d["channel_files"]) == sorted(GOOD)
    [(folder, files)] = d["quarantine"].items()
    assert files == sorted(["manifest.json", f"0-{BAD}"])
    assert d["grubenv"]["boot_count"] == "0"
    inc = report.server_incident
    assert inc["title"] == "general protection fault in sensor_parse_channel"
    assert inc["channel_file"] == f"var/lib/sensor/channels/{BAD}"
    assert report.boot.entries_chosen[:3] == ["os", "os", "recovery"]
    assert report.boot.entries_chosen[-1] == "os"
    assert report.device["state"] == "healthy"
    # File by file, the OS against the image before the fault: the bad file went to quarantine
    # (it was added after this image was made, so it is in neither), the agent kept its
    # journal and last directive; nothing else changed but what any boot changes.
    provisioned = debian.build_debian_image("channel-file", firmware=firmware, log=lambda _: None)
    before = provisioned.server_key.parent / "disk.img"
    after = tmp_path / "run" / "vm" / "disk.qcow2"
    for part in (debian.BOOT_PART, debian.ROOT_PART):
        old = tree_digest(before, part, tmp_path / f"before-{part}")
        new = tree_digest(after, part, tmp_path / f"after-{part}")
        differ = sorted(set(old) ^ set(new) | {p for p in set(old) & set(new) if old[p] != new[p]})
        ours = [p for p in differ if not p.startswith(NORMAL_BOOT_CHANGES)]
        if part == debian.BOOT_PART:
            assert ours == [], ours  # grubenv is back at boot_count=0, rewritten in place
            continue
        directive = folder  # the quarantine's folder is named for the directive
        quarantined = [p for p in ours if p.startswith("var/lib/recovery/quarantine")]
        assert quarantined == [
            "var/lib/recovery/quarantine",
            f"var/lib/recovery/quarantine/{directive}",
            f"var/lib/recovery/quarantine/{directive}/0-{BAD}",
            f"var/lib/recovery/quarantine/{directive}/manifest.json",
        ], ours
        # The agent's state: the apply's journal and the directive, last-directive until the
        # healthy boot confirms it, confirmed-directive after (the run may end before that
        # is on disk).
        # Crash records are archived by systemd-pstore or, when it has not yet, by the agent
        # (var/lib/recovery/pstore): the evidence of the failed boots, kept.
        archived = {p for p in ours if p.startswith("var/lib/recovery/pstore")}
        journal = {"var/lib/recovery/journal", f"var/lib/recovery/journal/{directive}.json"}
        # The inventory the healthy boot's report sent (health reports carry it since the
        # fleet-intelligence work: the next one sends changes to it).
        sent = {"var/lib/recovery/sent-inventory.json"}
        assert set(ours) - set(quarantined) - archived - sent in (
            journal | {"var/lib/recovery/last-directive"},
            journal | {"var/lib/recovery/confirmed-directive"},
        ), ours
        assert new[f"var/lib/recovery/quarantine/{directive}/0-{BAD}"] == sha256_bytes(
            channel_file("channel:bad-291")
        )
    # The panic's log reached the recovery environment through the firmware's pstore backend:
    # EFI variables on UEFI (efi_pstore, kept by OVMF's NVRAM), reserved RAM on BIOS (ramoops).
    backend = "efi" if firmware == "uefi" else "ramoops"
    assert f"QMR-PSTORE dmesg-{backend}-" in report.boot.console_text


@pytest.mark.qemu
@pytest.mark.slow
@can_build
@pytest.mark.timeout(7200)
@pytest.mark.parametrize("firmware", ["bios", "uefi"])
async def test_channel_file_on_an_encrypted_root_is_recovered_with_the_key_the_server_released(
    tmp_path, firmware: str
) -> None:
    """The root on LUKS2, opened at a normal boot by the lab's emulated TPM; the install added
    QMR's keyslot and sealed its key to the server's escrow key. In recovery the agent reports
    the crash, the lab's approver releases the key for that report, the agent opens the disk
    with dm-crypt, applies the fix and closes it again; no person typed anything. The audit log
    shows the release, and the key is nowhere in clear: not on the console, in the run's files,
    in the server's database or its WAL."""
    import base64

    from recovery_agent.protocol.wire import escrow_context
    from recovery_server.diskkeys import EscrowKeyFile
    from recovery_server.store import Store

    report = await recovered_run(tmp_path, "channel-file", encrypted=True, firmware=firmware)
    assert report.problems == []
    assert sorted(report.disk["channel_files"]) == sorted(GOOD)
    [(_, files)] = report.disk["quarantine"].items()
    assert files == sorted(["manifest.json", f"0-{BAD}"])
    assert report.boot.entries_chosen[:3] == ["os", "os", "recovery"]
    assert report.boot.entries_chosen[-1] == "os"
    assert report.device["state"] == "healthy"
    console = report.boot.console_text
    assert "the server released the disk key for this visit" in console
    assert "/dev/vda2 open as /dev/mapper/qmr-os (the key wiped from memory), mounted at /mnt/os" in console
    assert "the OS disk is unmounted and /dev/vda2 closed again" in console

    store = Store(tmp_path / "run" / "server" / "recovery.db")
    try:
        kinds = [r["kind"] for r in store.all("SELECT kind FROM events ORDER BY seq")]
        row = store.one("SELECT device_id, slot, sealed FROM disk_keys")
    finally:
        store.close()
    steps = ["disk_key.escrowed", "disk_key.requested", "disk_key.release_approved", "disk_key.released"]
    steps += ["directive.issued"]
    assert [k for k in kinds if k in steps] == steps, kinds
    image = debian.build_debian_image("channel-file", encrypted=True, firmware=firmware, log=lambda _: None)
    assert image.escrow_key is not None
    key = EscrowKeyFile.load(image.escrow_key).open(
        row["sealed"], escrow_context(row["device_id"], row["slot"])
    )
    forms = [bytes(key), bytes(key).hex().encode(), base64.b64encode(bytes(key))]
    assert not any(f.decode(errors="ignore") in console for f in forms[1:])
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file() and path.suffix != ".qcow2":  # (the disk holds it in its keyslot, derived)
            data = path.read_bytes()
            assert not any(f in data for f in forms), f"the disk key is in {path}"


@pytest.mark.qemu
@pytest.mark.slow
@can_build
@pytest.mark.timeout(7200)
async def test_an_oops_without_a_panic_is_recovered_through_the_failing_health_check(tmp_path) -> None:
    """Installed without --panic-on-oops: the driver's oops leaves the boot going, the vendor's
    required health check fails (the driver is not live), the health verdict saves the kernel
    log and reboots; after two such boots the recovery environment names the crash from that
    log (or pstore's Oops record) and the fix is applied."""

    report = await recovered_run(tmp_path, "channel-file", panic_on_oops=False)
    assert report.boot.guest_panicked == 0
    failed_boots = report.boot.console_text.split("QMR-GRUB entry=recovery")[0]
    assert failed_boots.count("QMR-UNHEALTHY required check failed: required.d/50-sensor.sh") == 2
    assert "Kernel panic" not in failed_boots
    assert report.server_incident["title"] == "general protection fault in sensor_parse_channel"
    assert report.server_incident["channel_file"] == f"var/lib/sensor/channels/{BAD}"
    assert report.boot.entries_chosen[:3] == ["os", "os", "recovery"]
    assert report.device["state"] == "healthy"


@pytest.mark.qemu
@pytest.mark.slow
@can_build
@pytest.mark.timeout(7200)
@pytest.mark.parametrize("firmware", ["bios", "uefi"])
async def test_bad_driver_on_stock_debian_is_recovered_by_restoring_the_vendors_stored_version(
    tmp_path: Path, firmware: str
) -> None:
    """The vendor's package keeps 1.0 in the driver store; 2.0 crashes at init at every boot."""
    report = await recovered_run(tmp_path, "bad-driver", firmware=firmware)
    assert report.server_incident["guilty_frame"] == "sensor_v2_init_tables"
    [manifest] = report.disk["manifests"].values()
    assert "extra/sensor.ko" in json.dumps(manifest), "the 2.0 driver went to quarantine"
    healthy_boot = report.boot.console_text.split("QMR-GRUB entry=os")[-1]  # the last boot
    assert "sensor: version 1.0" in healthy_boot and "sensor: version 2.0" not in healthy_boot
    assert report.device["state"] == "healthy"


@pytest.mark.qemu
@pytest.mark.slow
@can_build
@pytest.mark.timeout(7200)
@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_nothing_of_ours_in_the_debian_image_was_placed_by_the_lab(tmp_path: Path, firmware: str) -> None:
    image = debian.build_debian_image("healthy", log=lambda _: None, firmware=firmware)
    provisioned = image.server_key.parent
    manifest = json.loads((provisioned / "install-manifest.json").read_text())
    recorded = {c["path"] for c in manifest["changes"]}
    with DiskImage(image.image) as d:
        for rel in OURS:
            assert rel in recorded, f"/{rel} is in the image but the installer did not record it"
            assert (
                d.ext4_listdir(debian.ROOT_PART, rel)
                or d.ext4_file(debian.ROOT_PART, rel) is not None
                or (rel.startswith("boot/") and d.ext4_listdir(debian.BOOT_PART, rel.removeprefix("boot/")))
            ), f"/{rel} is recorded but not in the image"
        assert d.ext4_file(debian.ROOT_PART, "etc/systemd/system/qmr-lab-provision.service") is None


def test_the_lab_base_stays_the_default_of_build_and_run() -> None:
    from recovery_lab import cli
    from recovery_lab.loop import RunOptions

    assert RunOptions(scenario="channel-file").base == "lab"
    seen: dict[str, str] = {}
    for cmd in ("build", "run"):
        original = cli._build if cmd == "build" else cli._run

        def capture(args: argparse.Namespace, cmd: str = cmd) -> int:
            seen[cmd] = args.base
            return 0

        setattr(cli, f"_{cmd}", capture)
        try:
            # the parsers bind the functions when built: rebuild them through main
            assert cli.main([cmd, "channel-file"]) == 0
        finally:
            setattr(cli, f"_{cmd}", original)
    assert seen == {"build": "lab", "run": "lab"}


def test_a_run_on_the_debian_base_refuses_timing_the_installer_did_not_bake_in() -> None:
    from recovery_lab.build import BuildError
    from recovery_lab.loop import RunOptions, _debian_image

    opts = RunOptions(scenario="channel-file", base="debian", retry_interval_min=1, log=lambda _: None)
    with pytest.raises(BuildError, match="cannot change retry_interval_min"):
        _debian_image(opts)
