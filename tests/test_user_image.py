"""A user's own disk image (recovery_lab/build/userimage.py).

Without a VM: small disks made here (GPT or MBR, ext4 made with mkfs.ext4 -d) stand for a
user's image; the lab finds their root, /boot, kernel and firmware, names what is missing,
and writes its provisioning unit into a copy without touching the user's file. With QEMU
(``slow``): the example image (GPT, GRUB installed by the machine itself, the vendor's
driver, no QMR) taken through the installer and recovered from a vendor's own bad driver.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from recovery_agent.digest import sha256_file
from recovery_lab import disk
from recovery_lab.boot import BootReport
from recovery_lab.build import debian, userimage
from recovery_lab.build.cache import Cache, default_cache_dir
from recovery_lab.build.kernel import resolve_kernel, stage_kernel, stage_sensor
from recovery_lab.inspect import DiskImage
from recovery_lab.loop import RunOptions, run_async
from recovery_lab.runreport import render
from recovery_lab.tools import run

REPO = Path(__file__).resolve().parent.parent
ROOT_UUID = "0b0e4a2c-1111-4222-8333-444455556666"
BOOT_UUID = "0b0e4a2c-1111-4222-8333-777788889999"
DEBIAN = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\nID=debian\n'
STATUS = {"libc6": "2.36-9+deb12u13", "python3": "3.11.2-1+b1", "grub-pc": "2.06-13+deb12u1"}

needs_tools = pytest.mark.skipif(
    not all(shutil.which(t, path="/usr/sbin:/sbin:/usr/bin") for t in ("mkfs.ext4", "debugfs", "sfdisk")),
    reason="needs e2fsprogs and fdisk (scripts/setup.sh installs them)",
)


def _status(packages: dict[str, str]) -> str:
    return "".join(
        f"Package: {name}\nStatus: install ok installed\nVersion: {version}\n\n"
        for name, version in packages.items()
    )


def _write(root: Path, rel: str, data: str | bytes = b"") -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def _tree(
    tmp: Path,
    *,
    os_release: str = DEBIAN,
    packages: dict[str, str] | None = None,
    fstab: str = f"UUID={ROOT_UUID} / ext4 errors=remount-ro 0 1\n",
    boot_prefix: str = "boot/",
    grub: str | None = "i386-pc",
) -> tuple[Path, Path]:
    """A root tree and a /boot tree (the same one when ``boot_prefix`` is "boot/")."""
    root, boot = tmp / "root", tmp / "boot"
    _write(root, "usr/lib/os-release", os_release)
    _write(root, "etc/fstab", fstab)
    _write(root, "var/lib/dpkg/status", _status(STATUS if packages is None else packages))
    # 6.1.0-57 is the newest kernel with modules; 6.2.0-1 has none; 6.1.0-9 is older.
    for release in ("6.1.0-9-amd64", "6.1.0-57-amd64"):
        _write(root, f"lib/modules/{release}/modules.dep")
    target = root if boot_prefix else boot
    for name in ("vmlinuz-6.1.0-9-amd64", "vmlinuz-6.1.0-57-amd64", "vmlinuz-6.2.0-1-amd64"):
        _write(target, boot_prefix + name, b"kernel " + name.encode())
    _write(target, boot_prefix + "initrd.img-6.1.0-57-amd64", b"initrd 57")
    if grub:
        _write(target, f"{boot_prefix}grub/{grub}/normal.mod", b"grub")
    return root, boot


def _ext4(tree: Path, out: Path, uuid: str, mib: int = 8) -> Path:
    debian.mkfs_ext4(tree, out, mib, uuid, "fs")
    return out


def _gpt_disk(tmp: Path, root_tree: Path, *, root_uuid: str = ROOT_UUID) -> Path:
    layout = [("bios-boot", disk.GPT_BIOS_BOOT, 1), ("root", disk.GPT_LINUX, 8)]
    out = tmp / "user.img"
    disk.assemble(
        out, disk.layout(layout), {2: _ext4(root_tree, tmp / "root.ext4", root_uuid)}, None, None, "gpt"
    )
    return out


def _mbr_disk(tmp: Path, boot_tree: Path, root_tree: Path) -> Path:
    layout = [("boot", disk.TYPE_LINUX, 8), ("root", disk.TYPE_LINUX, 8)]
    images = {
        1: _ext4(boot_tree, tmp / "boot.ext4", BOOT_UUID),
        2: _ext4(root_tree, tmp / "root.ext4", ROOT_UUID),
    }
    out = tmp / "user.img"
    disk.assemble(out, disk.layout(layout), images, None, None)
    return out


@needs_tools
def test_a_gpt_image_with_boot_on_the_root_is_understood(tmp_path: Path) -> None:
    root, _ = _tree(tmp_path)
    found = userimage.examine(_gpt_disk(tmp_path, root))
    assert found == userimage.FoundImage(
        table="gpt",
        root_part=2,
        root_uuid=ROOT_UUID,
        boot_part=None,
        firmware="bios",
        kernel_release="6.1.0-57-amd64",  # the newest kernel that has its modules
        libc=STATUS["libc6"],
        os_name="Debian GNU/Linux 12 (bookworm)",
    )
    assert found.grubenv == (2, "boot/grub/grubenv")


@needs_tools
def test_an_mbr_image_with_boot_on_its_own_partition_is_understood(tmp_path: Path) -> None:
    for spec in (f"UUID={BOOT_UUID}", "LABEL=fs-boot"):
        tmp = tmp_path / spec.split("=")[0]
        root, boot = _tree(
            tmp,
            os_release='NAME="Ubuntu"\nID=ubuntu\nID_LIKE=debian\n',
            fstab=f"UUID={ROOT_UUID} / ext4 defaults 0 1\n{spec} /boot ext4 defaults 0 2\n",
            boot_prefix="",
        )
        layout = [("boot", disk.TYPE_LINUX, 8), ("root", disk.TYPE_LINUX, 8)]
        images = {1: tmp / "boot.ext4", 2: _ext4(root, tmp / "root.ext4", ROOT_UUID)}
        run(["mkfs.ext4", "-q", "-F", "-L", "fs-boot", "-U", BOOT_UUID, "-d", boot, images[1], "8M"])
        disk.assemble(tmp / "user.img", disk.layout(layout), images, None, None)
        found = userimage.examine(tmp / "user.img")
        assert (found.table, found.root_part, found.boot_part, found.os_name) == ("mbr", 2, 1, "Ubuntu")
        assert found.grubenv == (1, "grub/grubenv") and found.kernel_release == "6.1.0-57-amd64"


@needs_tools
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"os_release": 'ID=fedora\nID_LIKE="rhel centos"\n'},
            "no ext4 partition holds a Debian-family system",
        ),
        ({"packages": {"libc6": "2.36", "grub-pc": "2.06"}}, "python3 is not installed"),
        ({"grub": None}, "GRUB \\(i386-pc\\) was never installed"),
        ({"packages": {**STATUS, "grub-efi-amd64": "2.06"}}, "pass --firmware bios or --firmware uefi"),
        ({"packages": {"libc6": "2.36", "python3": "3.11"}}, "neither grub-pc nor grub-efi-amd64"),
        (
            {"fstab": f"UUID={ROOT_UUID} / ext4 defaults 0 1\n/dev/vda1 /boot ext4 defaults 0 2\n"},
            "mounts /boot from /dev/vda1.*UUID=, LABEL= or PARTUUID=",
        ),
    ],
)
def test_what_an_image_lacks_is_named(tmp_path: Path, change: dict[str, object], message: str) -> None:
    root, _ = _tree(tmp_path, **change)  # type: ignore[arg-type]
    with pytest.raises(userimage.ImageError, match=message):
        userimage.examine(_gpt_disk(tmp_path, root))


@needs_tools
def test_a_kernel_without_its_initramfs_or_modules_is_named(tmp_path: Path) -> None:
    root, _ = _tree(tmp_path)
    (root / "boot/initrd.img-6.1.0-57-amd64").unlink()
    with pytest.raises(userimage.ImageError, match="has no /boot/initrd.img-6.1.0-57-amd64"):
        userimage.examine(_gpt_disk(tmp_path, root))
    shutil.rmtree(root / "lib/modules")
    with pytest.raises(userimage.ImageError, match="no kernel in /boot with its modules"):
        userimage.examine(_gpt_disk(tmp_path, root))


@needs_tools
def test_firmware_asked_for_must_be_the_images(tmp_path: Path) -> None:
    root, _ = _tree(tmp_path)
    image = _gpt_disk(tmp_path, root)
    assert userimage.examine(image, "bios").firmware == "bios"
    with pytest.raises(userimage.ImageError, match="--firmware uefi, but grub-efi-amd64 is not installed"):
        userimage.examine(image, "uefi")


@needs_tools
def test_an_unclean_root_or_a_bare_filesystem_is_refused(tmp_path: Path) -> None:
    root, _ = _tree(tmp_path)
    image = _gpt_disk(tmp_path, root)
    part = disk.read_partitions(image)[1][1]
    with open(image, "r+b") as f:  # set the superblock's "journal needs recovery" flag
        f.seek(part.offset + 1024 + 0x60)
        (incompat,) = struct.unpack("<I", f.read(4))
        f.seek(part.offset + 1024 + 0x60)
        f.write(struct.pack("<I", incompat | userimage.EXT4_INCOMPAT_RECOVER))
    with pytest.raises(userimage.ImageError, match="not cleanly unmounted"):
        userimage.examine(image)
    bare = _ext4(root, tmp_path / "bare.ext4", ROOT_UUID)
    with pytest.raises(userimage.ImageError, match="whole disk"):
        userimage.examine(bare)


@needs_tools
def test_the_users_file_is_only_read_and_the_copy_gets_the_labs_harness(tmp_path: Path) -> None:
    """A qcow2 of the user's image: the stage's raw copy has the provisioning unit (enabled)
    and the serial console; the user's file is unchanged; its kernel is beside the copy."""
    root, _ = _tree(tmp_path)
    raw = _gpt_disk(tmp_path, root)
    qcow2 = tmp_path / "mine.qcow2"
    run(["qemu-img", "convert", "-O", "qcow2", raw, qcow2])
    before = sha256_file(qcow2)
    lines: list[str] = []
    cache = Cache(tmp_path / "cache", lines.append)
    out = userimage.stage_user_image(cache, qcow2, None, lines.append)
    assert sha256_file(qcow2) == before
    info = json.loads((out / "image.json").read_text())
    assert (info["format"], info["root_part"], info["firmware"]) == ("qcow2", 2, "bios")
    assert (out / "vmlinuz").read_bytes() == b"kernel vmlinuz-6.1.0-57-amd64"
    assert (out / "initrd.img").read_bytes() == b"initrd 57"
    unit = debian.PROVISION_UNIT
    with DiskImage(out / "disk.img") as d:
        assert d.ext4_file(2, f"etc/systemd/system/{unit}") == (debian.DEBIAN_RECIPES / unit).read_bytes()
        assert unit in d.ext4_listdir(2, "etc/systemd/system/multi-user.target.wants")
        assert d.ext4_file(2, debian.SERIAL_CONSOLE_CFG) is not None
        stat = run(["debugfs", "-R", f"stat /etc/systemd/system/multi-user.target.wants/{unit}", d._ext4(2)])
        assert "Type: symlink" in stat and f"/etc/systemd/system/{unit}" in stat
    # The same image again: taken from the cache; the machine it makes for provisioning.
    assert userimage.stage_user_image(cache, qcow2, None, lines.append) == out
    machine = userimage.user_machine(out)
    assert (machine.root_part, machine.root_uuid, machine.grub_install) == (2, ROOT_UUID, False)


@needs_tools
def test_a_file_that_is_not_a_disk_image_is_named(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache", lambda _: None)
    with pytest.raises(userimage.ImageError, match="no such image file"):
        userimage.stage_user_image(cache, tmp_path / "missing.qcow2", None, lambda _: None)
    small = tmp_path / "small.img"
    small.write_bytes(b"\0" * 4096)
    with pytest.raises(userimage.ImageError, match="whole disk"):
        userimage.stage_user_image(cache, small, None, lambda _: None)


can_build = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mmdebstrap") is None,
    reason="the example image needs root and mmdebstrap (scripts/setup.sh --lab)",
)


@pytest.mark.qemu
@pytest.mark.slow
@can_build
@pytest.mark.timeout(7200)
@pytest.mark.parametrize("firmware", ["bios"])  # (uefi: example-image makes one; not yet run through it)
async def test_a_users_own_image_broken_by_their_own_driver_is_recovered(
    tmp_path: Path, firmware: str
) -> None:
    """A vendor's CI: their image (a GPT disk, /boot on the root, GRUB the machine installed,
    their driver package, no QMR), QMR put on it by its installer, their new driver build
    (``file:``) crashing it at every boot; the machine recovers with the stored 1.0. The
    firmware is read from the image (its GRUB package)."""
    lines: list[str] = []
    cache = Cache(default_cache_dir().resolve(), lines.append)
    image = await asyncio.to_thread(
        userimage.make_example_image, tmp_path / "mine.qcow2", cache, firmware, lines.append
    )
    before = sha256_file(image)
    kernel = resolve_kernel()
    build = stage_sensor(cache, stage_kernel(cache, kernel), kernel) / "2.0" / "sensor.ko"
    (tmp_path / "vendor-build").mkdir()
    shutil.copy(build, tmp_path / "vendor-build" / "sensor.ko")
    text = (REPO / "images/scenarios/bad-driver.toml").read_text()
    scenario = tmp_path / "vendor-driver.toml"
    scenario.write_text(
        text.replace('name = "bad-driver"', 'name = "vendor-driver"').replace(
            'source = "sensor:2.0"', 'source = "file:vendor-build/sensor.ko"'
        )
    )
    opts = RunOptions(
        scenario=str(scenario),
        auto_approve=True,
        base="debian",
        image=image,
        firmware=None,
        timeout_s=2400,
        workdir=tmp_path / "run",
        keep=True,
        log=lines.append,
    )
    report = await run_async(opts)
    assert report.recovered, "\n".join(lines[-60:]) + render(report)
    assert sha256_file(image) == before, "the user's image file was only read"
    assert report.scenario == "vendor-driver"
    assert report.server_incident["guilty_frame"] == "sensor_v2_init_tables"
    [manifest] = report.disk["manifests"].values()
    assert "extra/sensor.ko" in json.dumps(manifest), "the 2.0 driver went to quarantine"
    healthy_boot = report.boot.console_text.split("QMR-GRUB entry=os")[-1]  # the last boot
    assert "sensor: version 1.0" in healthy_boot and "sensor: version 2.0" not in healthy_boot
    assert report.disk["grubenv"]["boot_count"] == "0", "grubenv on the root's /boot/grub"
    assert report.device["state"] == "healthy"
    assert any(
        f"GPT, root on partition 2, /boot on the root, kernel {kernel.release}, {firmware}" in line
        for line in lines
    )
    # QMR went on by its installer; GRUB stayed the image's own (no grub-install by the lab).
    [provisioned] = [line for line in lines if line.startswith("[debian-qmr") and "(debian-qmr-" in line]
    stage = default_cache_dir().resolve() / provisioned.rsplit("(", 1)[1].rstrip(")")
    console = (stage / "provision-console.log").read_text()
    assert "QMR-PROVISION-STEP recovery-agent install" in console
    assert "QMR-PROVISION-STEP grub-install" not in console


def test_image_means_the_debian_base_and_the_labs_base_refuses_it(capsys: pytest.CaptureFixture[str]) -> None:
    from recovery_lab import cli

    seen: dict[str, tuple[str, object]] = {}
    original = cli._run

    def capture(args: argparse.Namespace) -> int:
        seen["run"] = (args.base, args.firmware)
        return 0

    cli._run = capture  # type: ignore[assignment]
    try:
        assert cli.main(["run", "channel-file", "--image", "mine.qcow2"]) == 0
        assert seen["run"] == ("debian", None), "the firmware is the image's to say"
        assert cli.main(["run", "channel-file", "--base", "debian"]) == 0
        assert seen["run"] == ("debian", "bios")
        assert cli.main(["run", "channel-file", "--base", "lab", "--image", "mine.qcow2"]) == 2
    finally:
        cli._run = original  # type: ignore[assignment]
    assert "use --base debian for --image" in capsys.readouterr().err


UNINSTALL_UNIT = """\
# The lab's uninstall test (tests/test_user_image.py); removes itself.
[Unit]
Description=QMR lab test: recovery-agent uninstall, then power off
After=multi-user.target
SuccessAction=poweroff
FailureAction=poweroff

[Service]
Type=oneshot
ExecStart=/bin/sh -c '/usr/local/sbin/recovery-agent uninstall; echo "QMR-LAB-UNINSTALL rc=$?"; \
rm -f /etc/systemd/system/multi-user.target.wants/qmr-lab-uninstall.service \
/etc/systemd/system/qmr-lab-uninstall.service; sync'
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
"""


def _tree_facts(top: Path) -> dict[str, str]:
    """rel path -> what it is: a file's mode and sha256, a link's target, a folder's mode."""
    facts = {}
    for path in sorted(top.rglob("*")):
        rel = str(path.relative_to(top))
        if path.is_symlink():
            facts[rel] = "-> " + os.readlink(path)
        elif path.is_dir():
            facts[rel] = f"dir {path.stat().st_mode & 0o7777:o}"
        else:
            facts[rel] = f"{path.stat().st_mode & 0o7777:o} {sha256_file(path)}"
    return facts


@pytest.mark.qemu
@pytest.mark.slow
@can_build
@pytest.mark.timeout(7200)
async def test_uninstall_on_the_machine_puts_etc_and_grub_cfg_back(tmp_path: Path) -> None:
    """The installed image boots; ``recovery-agent uninstall`` runs on it, as an admin runs
    it; then /etc and /boot/grub/grub.cfg are file for file what they were before the install
    (the image as the lab got it), but for the device key, which uninstall keeps and says so."""
    image_dir, machine, installed = await _installed_example(tmp_path)
    boot = await _boot_with_unit(tmp_path, installed, machine.root_part, "qmr-lab-uninstall", UNINSTALL_UNIT)
    tail = "\n".join(boot.console_text.splitlines()[-40:])
    assert "QMR-LAB-UNINSTALL rc=0" in boot.console_text, tail
    assert "kept the device key /etc/recovery/device.key" in boot.console_text, tail
    assert boot.outcome == "powered-off", tail
    facts = {}
    for name, source in (("before", image_dir / "disk.img"), ("after", tmp_path / "vm" / "disk.qcow2")):
        with DiskImage(source) as d:
            top = d.ext4_rdump(machine.root_part, tmp_path / name)
        facts[name] = {
            rel: fact
            for rel, fact in _tree_facts(top).items()
            if rel.startswith("etc/") or rel == "boot/grub/grub.cfg"
        }
    before, after = facts["before"], facts["after"]
    # The lab's provisioning unit was in the image the lab got and removed itself; the device
    # key stays (uninstall said so); nothing else in /etc or grub.cfg may differ.
    lab_unit = {
        f"etc/systemd/system/{debian.PROVISION_UNIT}",
        f"etc/systemd/system/multi-user.target.wants/{debian.PROVISION_UNIT}",
    }
    kept = {"etc/recovery", "etc/recovery/device.key", "etc/recovery/device.key.pub"}
    changed = (
        {rel for rel in before.keys() | after.keys() if before.get(rel) != after.get(rel)} - lab_unit - kept
    )
    assert sorted(changed) == [], {rel: (before.get(rel), after.get(rel)) for rel in sorted(changed)}
    assert "boot/grub/grub.cfg" in before and before["boot/grub/grub.cfg"] == after["boot/grub/grub.cfg"]


async def _installed_example(tmp_path: Path) -> tuple[Path, debian.Machine, Path]:
    """The example user image (cached), the lab's stage of it, and a copy of it with QMR
    installed by the provisioning boot (cached), in ``tmp_path``."""
    lines: list[str] = []
    cache = Cache(default_cache_dir().resolve(), lines.append)
    image = await asyncio.to_thread(
        userimage.make_example_image, tmp_path / "mine.qcow2", cache, "bios", lines.append
    )
    image_dir = await asyncio.to_thread(userimage.stage_user_image, cache, image, None, lines.append)
    machine = userimage.user_machine(image_dir)
    provisioned = await asyncio.to_thread(debian.stage_provisioned, cache, machine, "bios", lines.append)
    installed = tmp_path / "installed.img"
    run(["cp", "--sparse=always", provisioned / "disk.img", installed])
    return image_dir, machine, installed


async def _boot_with_unit(
    tmp_path: Path,
    installed: Path,
    root_part: int,
    name: str,
    unit_text: str,
    extra: Path | None = None,
    timeout: float = 3600,
) -> BootReport:
    """Boot ``installed`` through its own GRUB with the one-shot unit ``name`` enabled (it
    does its work, removes itself and powers off); ``extra``: a raw disk as /dev/vdb. The
    run's disk is ``tmp_path/vm/disk.qcow2``."""
    from recovery_lab.boot import follow_boot
    from recovery_lab.qemu import Drive, MachineConfig

    offset = next(p for p in disk.read_partitions(installed)[1] if p.number == root_part).offset
    unit = f"/etc/systemd/system/{name}.service"
    wants = f"/etc/systemd/system/multi-user.target.wants/{name}.service"
    userimage.debugfs_write(
        f"{installed}?offset={offset}",
        {unit: (unit_text.encode(), 0o644)},
        {wants: unit},
        tmp_path,
    )
    config = MachineConfig(
        disk=installed,
        memory_mb=debian.MEMORY_MB,
        watchdog=False,
        firmware="bios",
        extra_drives=[Drive(extra, "raw", "virtio", readonly=True)] if extra else [],
    )
    return await follow_boot(config, timeout=timeout, keep_logs=True, run_dir=tmp_path / "vm", name=name)


KERNEL_UNIT = """\
# The lab's kernel-upgrade test (tests/test_user_image.py); removes itself.
[Unit]
Description=QMR lab test: install a second kernel package, then power off
After=multi-user.target
ConditionPathExists=/dev/vdb
SuccessAction=poweroff
FailureAction=poweroff

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'mkdir -p /mnt/kernel && mount -o ro /dev/vdb /mnt/kernel && \
dpkg -i /mnt/kernel/*.deb; echo "QMR-LAB-KERNEL rc=$?"; umount /mnt/kernel; \
rm -f /etc/systemd/system/multi-user.target.wants/qmr-lab-kernel.service \
/etc/systemd/system/qmr-lab-kernel.service; sync'
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
"""


@pytest.mark.qemu
@pytest.mark.slow
@can_build
@pytest.mark.timeout(7200)
async def test_a_second_kernel_package_rebuilds_the_recovery_environment_on_the_machine(
    tmp_path: Path,
) -> None:
    """``dpkg -i`` of a second linux-image package on the installed machine (Debian's cloud
    flavour of the same kernel, which sorts newer): the installer's postinst.d hook rebuilds
    the recovery environment from it, and update-grub keeps one recovery entry."""
    image_dir, machine, installed = await _installed_example(tmp_path)
    release = userimage.found_image(image_dir).kernel_release
    second = release.replace("-amd64", "-cloud-amd64")
    debs = tmp_path / "debs"
    debs.mkdir()
    run(["apt-get", "download", f"linux-image-{second}"], cwd=debs)
    debian.mkfs_ext4(debs, tmp_path / "debs.ext4", 128, "51a2c0de-de12-4000-8000-0000000000cc", "kernel")
    # (Debian's own initramfs of the new kernel is made with MODULES=most, then the recovery
    # environment's: most of an hour under TCG on a loaded machine.)
    boot = await _boot_with_unit(
        tmp_path,
        installed,
        machine.root_part,
        "qmr-lab-kernel",
        KERNEL_UNIT,
        tmp_path / "debs.ext4",
        timeout=6600,
    )
    tail = "\n".join(boot.console_text.splitlines()[-40:])
    assert "QMR-LAB-KERNEL rc=0" in boot.console_text, tail
    assert boot.outcome == "powered-off", tail
    with DiskImage(installed) as d:
        old_initrd = d.ext4_file(machine.root_part, "boot/qmr/initrd.img")
    with DiskImage(tmp_path / "vm" / "disk.qcow2") as d:
        root = machine.root_part
        assert (d.ext4_file(root, "boot/qmr/kernel-release") or b"").decode().strip() == second
        kernel = d.ext4_file(root, f"boot/vmlinuz-{second}")
        assert kernel and d.ext4_file(root, "boot/qmr/vmlinuz") == kernel, (
            "the recovery kernel is the new one"
        )
        assert d.ext4_file(root, "boot/qmr/initrd.img") not in (None, old_initrd), "a new initramfs"
        grub_cfg = (d.ext4_file(root, "boot/grub/grub.cfg") or b"").decode()
    assert grub_cfg.count("menuentry 'Quick Machine Recovery'") == 1, grub_cfg
    assert f"vmlinuz-{second}" in grub_cfg, "update-grub saw the new kernel"
