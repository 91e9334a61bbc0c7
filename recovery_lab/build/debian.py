"""The lab on a stock distribution: Debian 12, with QMR installed by its own installer.

``recovery-lab build --base debian SCENARIO`` makes a disk image in cached stages (each a
directory of the cache, :mod:`~recovery_lab.build.cache`)::

    debian-tree     mmdebstrap --variant=minbase bookworm with PACKAGES (systemd, udev,
                    kmod, the kernel, initramfs-tools, python3, busybox, ...) and the firmware's
                    GRUB (grub-pc on BIOS, grub-efi-amd64 on UEFI), keyed by the candidate
                    versions of those packages; dpkg -l of the tree recorded
    sensor-deb      the vendor's package, as a vendor ships a driver: sensor.ko 1.0 built
                    against the tree's kernel headers in /lib/modules/<release>/extra, loaded
                    by systemd-modules-load (/etc/modules-load.d/sensor.conf), its channel
                    files, its previous version in the driver store, its greenboot health
                    check (images/sensor/debian/)
    debian-base     the image before QMR: the tree with the image's own settings
                    (images/debian/: serial console, DHCP, fstab by UUID) and the vendor's
                    package installed with dpkg; /boot on its own partition (GRUB writes
                    grubenv there: it cannot inside LUKS); on UEFI an EFI system partition
                    (FAT, mounted at /boot/efi) after the root; MBR, no boot code yet
    debian-qmr      a provisioning boot under QEMU (update-grub and grub-install need the
                    machine's block devices, which a chroot has not): Debian's own
                    grub-install and update-grub, then `python3 -m recovery_agent.install
                    install` from a bundle disk (the agent's sources and wheels, the lab's
                    fleet settings) exactly as an admin runs it; the lab's provisioning unit
                    removes itself; the disk is kept with the device key the install made
    debian-disk     per scenario: the scenario's files changed on the root partition with
                    debugfs (no mount), the fault last, after QMR was installed

UEFI machines boot with OVMF (``recovery_lab.qemu``: its variables kept in the run directory,
where the kernel's ``efi_pstore`` keeps a panic's log); GRUB is installed the removable way
(``EFI/BOOT/BOOTX64.EFI``, no boot entry in NVRAM), so a fresh variable store boots it.

The lab's recovery server uses the key made in ``debian-qmr`` (the image's settings pin its
public half), and enrolls the device key the installer made on the machine.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recovery_agent.digest import sha256_file
from recovery_agent.layout import CHANNEL_DIR, DRIVER_STORE, ESCROW_PENDING
from recovery_agent.protocol import envelope
from recovery_agent.protocol.keys import SigningKey, public_b64
from recovery_agent.protocol.wire import EscrowKey, utcnow
from recovery_server.diskkeys import EscrowKeyFile

from .. import disk
from ..checkout import AGENT_PACKAGE, IMAGES
from ..inspect import DiskImage
from ..pyruntime.download import download_wheels, glibc_version, installed_pins
from ..scenario import Scenario, ScenarioError, find_scenario, load_scenario
from ..tools import package_version, require, run
from . import luksimage
from .cache import BuildError, Cache, Log, default_cache_dir, files_hash
from .kernel import apt_candidates, resolve_kernel, stage_kernel, stage_sensor
from .osroot import BASE_CHANNELS, change_bytes, source_bytes

SUITE = "bookworm"
MIRRORS = (
    f"deb http://deb.debian.org/debian {SUITE} main",
    f"deb http://deb.debian.org/debian {SUITE}-updates main",
    f"deb http://deb.debian.org/debian-security {SUITE}-security main",
)
PACKAGES = (
    "systemd-sysv",
    "udev",
    "kmod",
    "linux-image-amd64",
    "initramfs-tools",
    "python3",
    "busybox",
    "e2fsprogs",
    "zstd",
    # LUKS2 roots (the encrypted base): cryptsetup and its initramfs hook and boot script
    "cryptsetup-initramfs",
    # systemd-logind needs D-Bus; without it nothing handles the ACPI power button, and a lab
    # run that ends with a clean shutdown (system_powerdown) would wait for nothing
    "dbus",
)
GRUB_PACKAGES = {"bios": ("grub-pc",), "uefi": ("grub-efi-amd64", "dosfstools")}
FIRMWARES = tuple(GRUB_PACKAGES)
REQUIRED_TOOLS = (
    "mmdebstrap",
    "chroot",
    "dpkg-deb",
    "mkfs.ext4",
    "debugfs",
    "qemu-img",
    "qemu-system-x86_64",
)
UEFI_TOOLS = ("mkfs.fat",)

# The disk: p1 /boot (ext4), p2 / (ext4), on UEFI p3 /boot/efi (FAT). Fixed UUIDs: the
# image's fstab names them.
PARTITIONS = [("boot", disk.TYPE_LINUX, 512), ("root", disk.TYPE_LINUX, 3072)]
ESP_PARTITION = ("esp", disk.TYPE_EFI, 128)
BOOT_PART, ROOT_PART, ESP_PART = 1, 2, 3
BOOT_UUID = "51a2c0de-de12-4000-8000-0000000000b1"
ROOT_UUID = "51a2c0de-de12-4000-8000-0000000000b2"
ESP_VOLUME_ID = "51A2C0DE"  # FAT's serial number; fstab names it UUID=51A2-C0DE
# The encrypted base: the root partition is LUKS2 (this UUID), opened as /dev/mapper/ROOT_MAPPER.
ROOT_LUKS_UUID = "51a2c0de-de12-4000-8000-0000000000c2"
ROOT_MAPPER = "qmr_root"
# The lab's stand-in for a TPM (an emulation): the normal boot's unlock key is a QEMU fw_cfg
# file of the machine (not on its disk), read by a crypttab keyscript that only the OS's
# initramfs has. A real TPM releases its key only to the measured normal boot; here the
# recovery environment simply has no reader for it, and asks the server instead.
TPM_STANDIN_FW_CFG = "opt/org.qmr-lab/tpm-standin-key"
TPM_STANDIN_SCRIPT = "usr/local/lib/qmr-lab/tpm-standin-key"
TPM_STANDIN_SYSFS = f"/sys/firmware/qemu_fw_cfg/by_name/{TPM_STANDIN_FW_CFG}/raw"
HOSTNAME = "qmr-debian"
# The guest's side of the server address in the image's settings (the lab forwards it).
GUEST_SERVER = "http://10.0.2.100:8080"
GUEST_PORT = 8080
MEMORY_MB = 1024

# The QMR settings baked into the image by the installer (lab minutes of one second); a run
# on this base uses these (loop.RunOptions' defaults are the same).
LAB_TIMING = {
    "seconds_per_minute": 1.0,
    "retry_interval_min": 5,
    "time_to_reboot_min": 90,
    "max_recovery_attempts": 3,
    "long_poll_s": 10,
}
# What the lab's installer run asks for besides the bundle's wheels and settings. The recovery
# environment takes only the drivers this machine boots with (MODULES=dep) and its network card:
# mkinitramfs with MODULES=most did not finish in 7 minutes under TCG. A driver's oops panics
# the machine (--panic-on-oops, what a fleet that wants a crash to count at once sets) unless
# the image is built without it: then the oops leaves the boot going, the vendor's required
# health check fails, and the health verdict reboots (greenboot's model).
INSTALL_ARGS = "--panic-timeout 5 --boot-limit 2 --recovery-modules dep --extra-module virtio_net"


def install_args(panic_on_oops: bool = True) -> str:
    return ("--panic-on-oops " if panic_on_oops else "") + INSTALL_ARGS


PROVISION_TIMEOUT_S = 3600.0

DEBIAN_RECIPES = IMAGES / "debian"
SENSOR_PACKAGE = IMAGES / "sensor" / "debian"


@dataclass(frozen=True)
class DebianImage:
    """A built Debian image for one scenario, with what a run needs to talk to it."""

    scenario: str
    image: Path  # raw disk image (boot it through a qcow2 overlay)
    manifest: Path
    kernel_release: str
    device_id: str
    server_key: Path  # the lab server's key the image's settings pin
    device_key: Path  # the device key the installer made on the machine
    firmware: str = "bios"
    expect: dict[str, Any] = field(default_factory=dict)
    panic_on_oops: bool = True
    root_part: int = 2  # the root filesystem's partition
    grubenv: tuple[int, str] = (1, "grub/grubenv")  # (partition, path) of GRUB's grubenv
    base: str = "debian"  # or the user's image file it was made from
    # The encrypted base: the lab's emulated TPM (a fw_cfg file QEMU gives the machine), the
    # lab's key to the root's data (luksimage.py), the server's escrow key (escrow.key), the
    # escrow the install sealed for the server (the first health report would deliver it).
    tpm_key: Path | None = None
    volume_key: Path | None = None
    escrow_key: Path | None = None
    escrow_message: Path | None = None

    @property
    def encrypted(self) -> bool:
        return self.volume_key is not None

    def qemu_args(self) -> list[str]:
        """What QEMU adds for this machine (the emulated TPM's fw_cfg file)."""
        return tpm_standin_args(self.tpm_key)

    def volumes(self) -> dict[int, bytes]:
        """Partition -> LUKS2 volume key, for reading the disk (``DiskImage(volumes=...)``)."""
        return {self.root_part: self.volume_key.read_bytes()} if self.volume_key else {}


def tpm_standin_args(tpm_key: Path | None) -> list[str]:
    return ["-fw_cfg", f"name={TPM_STANDIN_FW_CFG},file={tpm_key}"] if tpm_key else []


def _tree_release(root: Path) -> str:
    releases = sorted(p.name.removeprefix("vmlinuz-") for p in (root / "boot").glob("vmlinuz-*"))
    if len(releases) != 1:
        raise BuildError(f"expected one kernel in the Debian tree, found {releases or 'none'}")
    return releases[0]


def partitions(firmware: str) -> list[tuple[str, int, int]]:
    return PARTITIONS + [ESP_PARTITION] if firmware == "uefi" else list(PARTITIONS)


def stage_tree(cache: Cache, firmware: str = "bios") -> Path:
    """``root/``: Debian 12 minbase with :data:`PACKAGES` and the firmware's GRUB, made by
    mmdebstrap (as root)."""
    packages = PACKAGES + GRUB_PACKAGES[firmware]

    def build(out: Path) -> None:
        root = out / "root"
        run(
            [
                "mmdebstrap",
                "--variant=minbase",
                "--include=" + ",".join(packages),
                SUITE,
                root,
                *MIRRORS,
            ]
        )
        (out / "packages.txt").write_text(run(["chroot", root, "dpkg-query", "-W"]))
        (out / "tree.json").write_text(json.dumps({"kernel_release": _tree_release(root)}) + "\n")

    inputs = {
        "suite": SUITE,
        "mirrors": MIRRORS,
        "packages": apt_candidates(packages),
        "mmdebstrap": package_version("mmdebstrap"),
    }
    return cache.stage("debian-tree", inputs, build, f"{SUITE}, {firmware}")


def stage_vendor_package(cache: Cache, tree_dir: Path) -> tuple[Path, Path]:
    """The sensor vendor's ``sensor-driver_1.0_amd64.deb`` for the tree's kernel, and the
    sensor stage (every built version of the driver, for scenario sources)."""
    release = json.loads((tree_dir / "tree.json").read_text())["kernel_release"]
    kernel = resolve_kernel()
    if kernel.release != release:
        raise BuildError(
            f"the Debian tree runs kernel {release} but apt here offers {kernel.release}: "
            f"run apt-get update (the tree and the sensor must be built from the same archive)"
        )
    sensor_dir = stage_sensor(cache, stage_kernel(cache, kernel), kernel)
    recipes = sorted(SENSOR_PACKAGE.iterdir())

    def build(out: Path) -> None:
        pkg = out / "pkg"
        ko = (sensor_dir / "1.0" / "sensor.ko").read_bytes()
        files: dict[str, tuple[bytes, int]] = {
            f"lib/modules/{release}/extra/sensor.ko": (ko, 0o644),
            f"{DRIVER_STORE}/sensor/1.0/sensor.ko": (ko, 0o644),
            "etc/modules-load.d/sensor.conf": ((SENSOR_PACKAGE / "sensor.conf").read_bytes(), 0o644),
            "etc/greenboot/check/required.d/50-sensor.sh": (
                (SENSOR_PACKAGE / "50-sensor.sh").read_bytes(),
                0o755,
            ),
        }
        for name, source in BASE_CHANNELS.items():
            files[f"{CHANNEL_DIR}/{name}"] = (source_bytes(source, sensor_dir), 0o644)
        for rel, (data, mode) in files.items():
            path = pkg / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            path.chmod(mode)
        debian = pkg / "DEBIAN"
        debian.mkdir()
        (debian / "control").write_text(
            "Package: sensor-driver\nVersion: 1.0\nArchitecture: amd64\n"
            f"Depends: linux-image-{release}\nMaintainer: QMR lab <lab@example.invalid>\n"
            "Description: the lab's sensor driver (loads channel files at boot)\n"
        )
        (debian / "conffiles").write_text("/etc/modules-load.d/sensor.conf\n")
        postinst = (SENSOR_PACKAGE / "postinst").read_text().replace("@KERNEL_RELEASE@", release)
        (debian / "postinst").write_text(postinst)
        (debian / "postinst").chmod(0o755)
        run(["dpkg-deb", "--root-owner-group", "--build", pkg, out / "sensor-driver_1.0_amd64.deb"])
        shutil.rmtree(pkg)

    inputs = {"release": release, "sensor": sensor_dir.name, "recipes": files_hash(recipes)}
    return cache.stage("sensor-deb", inputs, build, release) / "sensor-driver_1.0_amd64.deb", sensor_dir


def _write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)


def mkfs_ext4(root: Path, out: Path, size_mib: int, uuid: str, label: str) -> None:
    with open(out, "wb") as f:
        f.truncate(size_mib * disk.MIB)
    run(["mkfs.ext4", "-q", "-F", "-L", label, "-U", uuid, "-E", "root_owner=0:0,nodiscard", "-d", root, out])


def mkfs_esp(out: Path, size_mib: int) -> None:
    with open(out, "wb") as f:
        f.truncate(size_mib * disk.MIB)
    run(["mkfs.fat", "-F", "32", "-i", ESP_VOLUME_ID, "-n", "ESP", out])


PROVISION_UNIT = "qmr-lab-provision.service"
SERIAL_CONSOLE_CFG = "etc/default/grub.d/lab-serial-console.cfg"


def prepare_root(root: Path, fstab: str, deb: Path) -> None:
    """The image's own settings on a copy of the Debian tree: fstab, host name, the serial
    console (the lab follows the boot there), DHCP on the lab's network, root without a
    password, the lab's provisioning unit (it removes itself), and the vendor's package."""
    _write(root / "etc/fstab", fstab)
    _write(root / "etc/hostname", f"{HOSTNAME}\n")
    _write(root / "etc/hosts", f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n")
    _write(root / SERIAL_CONSOLE_CFG, (DEBIAN_RECIPES / "grub-serial-console.cfg").read_bytes())
    _write(
        root / "etc/systemd/network/20-lab-dhcp.network",
        (DEBIAN_RECIPES / "20-lab-dhcp.network").read_bytes(),
    )
    unit = PROVISION_UNIT
    _write(root / "etc/systemd/system" / unit, (DEBIAN_RECIPES / unit).read_bytes())
    (root / "etc/systemd/system/multi-user.target.wants").mkdir(parents=True, exist_ok=True)
    (root / "etc/systemd/system/multi-user.target.wants" / unit).symlink_to(f"/etc/systemd/system/{unit}")
    run(["chroot", root, "systemctl", "enable", "systemd-networkd.service"])
    # No person at a lab machine's console: its first boot must not ask for a locale.
    run(["chroot", root, "systemctl", "mask", "systemd-firstboot.service"])
    run(["chroot", root, "passwd", "-d", "root"])  # a lab machine: log in on the console
    shutil.copy(deb, root / "tmp" / deb.name)
    run(["chroot", root, "dpkg", "-i", f"/tmp/{deb.name}"])
    (root / "tmp" / deb.name).unlink()


TPM_STANDIN_KEYSCRIPT = f"""#!/bin/sh
# The lab's stand-in for a TPM (an emulation, see recovery_lab/build/debian.py): the key that
# opens the root at a normal boot is a file of the virtual machine (QEMU fw_cfg), not of its
# disk. cryptsetup's initramfs runs this as the root's crypttab keyscript.
modprobe -q qemu_fw_cfg 2>/dev/null
cat {TPM_STANDIN_SYSFS}
"""


def encrypt_root_settings(root: Path, release: str) -> None:
    """What Debian's installer sets up for a root on LUKS2, with the lab's emulated TPM as the
    key: crypttab (a keyscript), fstab's root on the mapper, cryptsetup in the initramfs, and
    the initramfs rebuilt with them (cryptsetup's hook cannot see the volume from a chroot:
    CRYPTSETUP=y includes it anyway, with crypttab's entry)."""
    _write(root / TPM_STANDIN_SCRIPT, TPM_STANDIN_KEYSCRIPT, 0o755)
    _write(
        root / "etc/crypttab",
        f"{ROOT_MAPPER} UUID={ROOT_LUKS_UUID} none luks,keyscript=/{TPM_STANDIN_SCRIPT},initramfs\n",
    )
    modules = root / "etc/initramfs-tools/modules"
    modules.write_text(modules.read_text() + "qemu_fw_cfg\n")
    conf_hook = root / "etc/cryptsetup-initramfs/conf-hook"
    conf_hook.write_text(conf_hook.read_text() + "CRYPTSETUP=y\n")
    run(["chroot", root, "update-initramfs", "-u", "-k", release])


def stage_base(
    cache: Cache, tree_dir: Path, deb: Path, firmware: str = "bios", encrypted: bool = False
) -> Path:
    """``disk.img``: the stock image before QMR (see the module docstring), with the
    kernel and initramfs beside it for the provisioning boot. ``encrypted``: the root on
    LUKS2, opened at boot by the lab's emulated TPM; ``tpm-standin.key`` (the machine's, given
    to QEMU as a fw_cfg file) and ``volume.key`` (the lab's, to read and write the root from
    the host: :mod:`~recovery_lab.build.luksimage`) are kept beside it."""
    recipes = sorted(DEBIAN_RECIPES.iterdir())
    release = json.loads((tree_dir / "tree.json").read_text())["kernel_release"]
    layout = partitions(firmware)

    def build(out: Path) -> None:
        work = out / "work"
        root = work / "root"
        work.mkdir()
        run(["cp", "-a", tree_dir / "root", root])
        root_source = f"/dev/mapper/{ROOT_MAPPER}" if encrypted else f"UUID={ROOT_UUID}"
        fstab = f"{root_source} / ext4 errors=remount-ro 0 1\nUUID={BOOT_UUID} /boot ext4 defaults 0 2\n"
        if firmware == "uefi":
            fstab += f"UUID={ESP_VOLUME_ID[:4]}-{ESP_VOLUME_ID[4:]} /boot/efi vfat umask=0077 0 1\n"
        prepare_root(root, fstab, deb)
        if encrypted:
            encrypt_root_settings(root, release)
        # /boot on its own partition.
        boot = work / "boot"
        boot.mkdir()
        for entry in sorted((root / "boot").iterdir()):
            shutil.move(str(entry), boot / entry.name)
        shutil.copy(boot / f"vmlinuz-{release}", out / "vmlinuz")
        shutil.copy(boot / f"initrd.img-{release}", out / "initrd.img")
        images = {BOOT_PART: work / "boot.ext4", ROOT_PART: work / "root.ext4"}
        sizes = dict((name, mib) for name, _, mib in layout)
        if firmware == "uefi":
            (boot / "efi").mkdir(exist_ok=True)  # the ESP's mount point, on /boot
            images[ESP_PART] = work / "esp.fat"
            mkfs_esp(images[ESP_PART], sizes["esp"])
        mkfs_ext4(boot, images[BOOT_PART], sizes["boot"], BOOT_UUID, "boot")
        if encrypted:
            plain = work / "root.plain"
            mkfs_ext4(root, plain, sizes["root"] - luksimage.DATA_OFFSET // disk.MIB, ROOT_UUID, "root")
            tpm_key, volume_key = os.urandom(32), os.urandom(luksimage.VOLUME_KEY_BYTES)
            _write(out / "tpm-standin.key", tpm_key, 0o600)
            _write(out / "volume.key", volume_key, 0o600)
            luksimage.format_luks(images[ROOT_PART], sizes["root"], ROOT_LUKS_UUID, tpm_key, volume_key, work)
            luksimage.encrypt_into(plain, images[ROOT_PART], volume_key)
            plain.unlink()
        else:
            mkfs_ext4(root, images[ROOT_PART], sizes["root"], ROOT_UUID, "root")
        disk.assemble(out / "disk.img", disk.layout(layout), images, None, None)
        shutil.rmtree(work)
        (out / "base.json").write_text(json.dumps({"kernel_release": release, "encrypted": encrypted}) + "\n")

    inputs = {
        "tree": tree_dir.name,
        "deb": sha256_file(deb),
        "recipes": files_hash(recipes),
        "layout": layout,
        **({"encrypted": luksimage.CIPHER, "keyscript": TPM_STANDIN_KEYSCRIPT} if encrypted else {}),
    }
    return cache.stage(
        "debian-base", inputs, build, f"{release}, {firmware}" + (", root on LUKS2" if encrypted else "")
    )


def _agent_files() -> list[Path]:
    return sorted(p for p in AGENT_PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def _write_bundle(
    bundle: Path,
    wheels: list[Path],
    settings: dict[str, Any],
    firmware: str,
    args: str,
    grub_install: bool = True,
    escrow_key: dict[str, Any] | None = None,
) -> None:
    """The install bundle: the agent's sources, its wheels, the fleet settings, the script;
    for an encrypted root, the server's signed escrow key."""
    for src in _agent_files():
        _write(bundle / "recovery_agent" / src.relative_to(AGENT_PACKAGE), src.read_bytes())
    for wheel in wheels:
        _write(bundle / "wheels" / wheel.name, wheel.read_bytes())
    _write(bundle / "settings.json", json.dumps(settings, indent=1) + "\n")
    if escrow_key is not None:
        _write(bundle / "escrow-key.json", json.dumps(escrow_key) + "\n")
        # The machine's normal-boot key, from the emulated TPM, opens the root to add QMR's slot.
        args += f" --luks-unlock-key-file {TPM_STANDIN_SYSFS} --escrow-key escrow-key.json"
    write_script(bundle, firmware, args, grub_install)


def write_script(
    bundle: Path, firmware: str, args: str, grub_install: bool, install_qmr: bool = True
) -> None:
    _write(bundle / "provision.sh", (DEBIAN_RECIPES / "provision.sh").read_bytes(), 0o755)
    conf = f'FIRMWARE={firmware}\nINSTALL_ARGS="{args}"\n'
    conf += "" if grub_install else "GRUB_INSTALL=no\n"
    conf += "" if install_qmr else "INSTALL_QMR=no\n"
    _write(bundle / "provision.conf", conf)


@dataclass(frozen=True)
class Machine:
    """A disk the provisioning boot starts (``disk.img`` in ``dir``, with the kernel and
    initramfs it boots directly, ``vmlinuz`` and ``initrd.img``): its root filesystem's
    partition and UUID, its libc version (for the agent's wheels), and whether GRUB is
    Debian's to install first (the lab's base) or already the image's own (a user's)."""

    dir: Path
    root_part: int
    root_uuid: str
    libc: str
    device_id: str
    grub_install: bool = True
    encrypted: bool = False  # the root on LUKS2 (tpm-standin.key, volume.key in ``dir``)

    @property
    def tpm_key(self) -> Path | None:
        return self.dir / "tpm-standin.key" if self.encrypted else None

    @property
    def volumes(self) -> dict[int, bytes]:
        return {self.root_part: (self.dir / "volume.key").read_bytes()} if self.encrypted else {}


def base_machine(base_dir: Path, tree_dir: Path, firmware: str) -> Machine:
    libc = re.search(r"^libc6:?\S*\t(\S+)$", (tree_dir / "packages.txt").read_text(), re.M)
    if libc is None:
        raise BuildError(f"no libc6 in {tree_dir / 'packages.txt'}")
    encrypted = bool(json.loads((base_dir / "base.json").read_text()).get("encrypted"))
    device_id = f"lab-debian-{firmware}" + ("-luks" if encrypted else "")
    return Machine(base_dir, ROOT_PART, ROOT_UUID, libc[1], device_id, encrypted=encrypted)


def stage_provisioned(
    cache: Cache, machine: Machine, firmware: str, log: Log, panic_on_oops: bool = True
) -> Path:
    """``disk.img`` with QMR installed in a provisioning boot, ``server.key`` (the lab server's
    key its settings pin), ``device.key`` (made on the machine), the install's manifest."""
    wheels = download_wheels(
        cache.root / "pyruntime" / "wheels", installed_pins(), glibc_version(machine.libc), log
    )
    device_id = machine.device_id
    # The bundle for this install's arguments (they are in the stage's inputs below).
    _bundle = functools.partial(
        _write_bundle, args=install_args(panic_on_oops), grub_install=machine.grub_install
    )

    def build(out: Path) -> None:
        server_key = SigningKey.generate()
        server_key.save(out / "server.key")
        escrow_envelope = None
        if machine.encrypted:
            # The lab server's escrow key, made here as `recovery-server init` makes one.
            escrow = EscrowKeyFile.generate()
            escrow.save(out / "escrow.key")
            escrow_envelope = envelope.seal(
                EscrowKey(public_key=escrow.public_b64, created_at=utcnow()), server_key
            )
        settings = {
            "device_id": device_id,
            "server_url": GUEST_SERVER,
            "server_public_key": public_b64(server_key.public),
            **LAB_TIMING,
        }
        bundle = out / "bundle"
        _bundle(bundle, wheels, settings, firmware, escrow_key=escrow_envelope)
        mkfs_ext4(bundle, out / "bundle.ext4", 256, "51a2c0de-de12-4000-8000-0000000000bb", "qmrbundle")
        shutil.rmtree(bundle)
        provision_boot(machine, out, firmware, log)
        kept = [
            ("etc/recovery/device.key", "device.key"),
            ("etc/recovery/agent.json", "agent.json"),
            ("var/lib/recovery/install/manifest.json", "install-manifest.json"),
        ]
        if machine.encrypted:
            kept.append((ESCROW_PENDING, "escrow-message.json"))
        with DiskImage(out / "disk.img", volumes=machine.volumes) as d:
            for rel, name in kept:
                data = d.ext4_file(machine.root_part, rel)
                if data is None:
                    raise BuildError(f"the installer left no /{rel} in the image")
                _write(out / name, data, 0o600)
        provisioned = json.loads((out / "provisioned.json").read_text())
        provisioned.update(device_id=device_id, firmware=firmware, root_part=machine.root_part)
        (out / "provisioned.json").write_text(json.dumps(provisioned) + "\n")

    inputs = {
        "base": machine.dir.name,
        "firmware": firmware,
        "agent": files_hash(_agent_files()),
        "wheels": [w.name for w in wheels],
        "recipes": files_hash(sorted(DEBIAN_RECIPES.iterdir())),
        "install_args": install_args(panic_on_oops),
        "timing": LAB_TIMING,
        "grub_install": machine.grub_install,
        "encrypted": machine.encrypted,
    }
    return cache.stage(
        "debian-qmr", inputs, build, firmware + ("" if panic_on_oops else ", oops keeps running")
    )


def provision_boot(machine: Machine, out: Path, firmware: str, log: Log) -> None:
    """Boot ``machine`` once with ``out/bundle.ext4`` as its second disk (the bundle's
    provision.sh runs); keep the disk it leaves as ``out/disk.img`` (raw) and its console
    as ``out/provision-console.log``; ``out/provisioned.json`` says how long it took."""
    boot = _provisioning_boot(machine, out / "bundle.ext4", out / "vm", firmware, log)
    (out / "provision-console.log").write_text(boot.console_text)
    if "QMR-PROVISIONED" not in boot.console_text:
        tail = "\n".join(boot.console_text.splitlines()[-25:])
        raise BuildError(
            f"the provisioning boot did not finish ({boot.outcome} after {boot.seconds:.0f} s); "
            f"console in {out / 'provision-console.log'}:\n{tail}"
        )
    overlay = out / "vm" / "disk.qcow2"
    # (through a new file: the overlay's backing file may be out/disk.img itself)
    run(["qemu-img", "convert", "-O", "raw", overlay, out / "disk.img.new"])
    (out / "disk.img.new").replace(out / "disk.img")
    shutil.rmtree(out / "vm")
    (out / "bundle.ext4").unlink()
    (out / "provisioned.json").write_text(json.dumps({"seconds": round(boot.seconds, 1)}) + "\n")


def _provisioning_boot(machine: Machine, bundle: Path, run_dir: Path, firmware: str, log: Log) -> Any:
    import asyncio

    from ..boot import follow_boot
    from ..qemu import Drive, MachineConfig

    run_dir.mkdir(parents=True, exist_ok=True)
    config = MachineConfig(
        disk=machine.dir / "disk.img",
        kernel=machine.dir / "vmlinuz",
        initrd=machine.dir / "initrd.img",
        append=f"root=UUID={machine.root_uuid} ro console=ttyS0,115200 panic=5",
        extra_drives=[Drive(bundle, "raw", "virtio", readonly=True)],
        extra_args=tpm_standin_args(machine.tpm_key),
        memory_mb=MEMORY_MB,
        watchdog=False,
        firmware=firmware,
    )

    def progress(seconds: float, line: str) -> None:
        # (systemd prefixes a unit's console lines with "[uptime] name[pid]: ")
        text = re.sub(r"^\[[ \d.]+\] \S+\[\d+\]: ", "", line.strip())
        if text.startswith(
            ("QMR-PROVISION", "installing", "runtime:", "device key", "recovery environment", "grub:")
        ):
            log(f"[provision +{seconds:6.1f}s] {text[:160]}")

    log(f"[provision] provisioning boot under QEMU (TCG: several minutes); console in {run_dir}")
    return asyncio.run(
        follow_boot(
            config,
            timeout=PROVISION_TIMEOUT_S,
            keep_logs=True,
            run_dir=run_dir,
            name="provision",
            on_line=progress,
        )
    )


def _debugfs_script(
    image: Path, offset: int, scenario: Scenario, sensor_dir: Path | None, release: str, scratch: Path
) -> list[str]:
    """debugfs commands that make the scenario's changes on the root filesystem."""
    cmds: list[str] = []
    fs = f"{image}?offset={offset}"
    for i, change in enumerate(scenario.files):
        path = "/" + change.path.replace("{kernel_release}", release)
        exists = "Inode:" in run(["debugfs", "-R", f"stat {path}", fs])
        if change.action == "add" and exists:
            raise ScenarioError(
                f"{scenario.name}: files[{i}]: {path} already exists in the image: use replace"
            )
        if change.action != "add" and not exists:
            raise ScenarioError(f"{scenario.name}: files[{i}]: {path} is not in the image: use add")
        if change.action == "remove":
            cmds.append(f"rm {path}")
            continue
        if change.action == "corrupt":
            local = scratch / f"old-{i}"
            run(["debugfs", "-R", f"dump -p {path} {local}", fs])
            data = bytearray(local.read_bytes())
            for j in range(min(64, len(data))):
                data[j] ^= 0xFF
            payload = bytes(data)
        else:
            payload = change_bytes(scenario, change, sensor_dir)
        local = scratch / f"new-{i}"
        local.write_bytes(payload)
        if exists:
            cmds.append(f"rm {path}")
        cmds += [f"write {local} {path}", f"sif {path} mode 0{0o100000 | change.file_mode:o}"]
    return cmds


def stage_scenario_disk(
    cache: Cache,
    provisioned: Path,
    scenario: Scenario,
    sensor_dir: Path | None,
    release: str,
    volume_key: bytes | None = None,
) -> Path:
    """``disk.img``: the provisioned image with the scenario's fault on its root partition."""
    if scenario.kernel_args:
        raise ScenarioError(
            f"{scenario.name}: kernel_args are not supported on the Debian base yet (its kernel arguments "
            f"come from update-grub): drop them or use the lab's own base"
        )

    def build(out: Path) -> None:
        image = out / "disk.img"
        run(["cp", "--sparse=always", provisioned / "disk.img", image])
        info = provisioned / "provisioned.json"
        root_part = json.loads(info.read_text()).get("root_part", ROOT_PART) if info.exists() else ROOT_PART
        _, parts = disk.read_partitions(image)
        part = next(p for p in parts if p.number == root_part)
        with tempfile.TemporaryDirectory(dir=out) as scratch:
            fs, offset = image, part.offset
            if volume_key is not None:  # the root's plaintext, changed, then encrypted back
                fs, offset = Path(scratch) / "root.plain", 0
                luksimage.decrypt_to(image, part.offset, part.size, volume_key, fs)
            cmds = _debugfs_script(fs, offset, scenario, sensor_dir, release, Path(scratch))
            if cmds:
                script = Path(scratch) / "cmds"
                script.write_text("\n".join(cmds) + "\n")
                run(["debugfs", "-w", "-f", script, f"{fs}?offset={offset}"])
                if volume_key is not None:
                    luksimage.encrypt_back(fs, image, part.offset, volume_key)
        manifest = {
            "base": "debian",
            "scenario": scenario.name,
            "scenario_sha256": scenario.source_sha256,
            "scenario_files": {src: sha for src, (_, sha) in sorted(scenario.local_files.items())},
            "expect": scenario.expect.model_dump(),
            "kernel_release": release,
            "provisioned": provisioned.name,
            "disk": {"file": image.name, "size": image.stat().st_size},
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    inputs = {
        "provisioned": provisioned.name,
        "scenario": scenario.build_sha256,
        "name": scenario.name,
        "sensor": sensor_dir.name if sensor_dir else None,
    }
    return cache.stage("debian-disk", inputs, build, scenario.name)


def build_debian_image(
    scenario: str,
    cache_dir: Path | None = None,
    log: Log = print,
    firmware: str | None = "bios",
    panic_on_oops: bool = True,
    image: Path | None = None,
    encrypted: bool = False,
) -> DebianImage:
    """Build (or take from the cache) the Debian image of ``scenario``; see the module
    docstring for the stages. ``panic_on_oops=False``: installed without --panic-on-oops.
    ``image``: a user's own disk image instead of the lab's base
    (:mod:`recovery_lab.build.userimage`); ``firmware=None`` then reads it from the image.
    ``encrypted``: the lab's base with its root on LUKS2 (not with ``image``)."""
    if encrypted and image is not None:
        raise BuildError("--encrypted is the lab's Debian base with a LUKS2 root: not with --image")
    if firmware is not None and firmware not in FIRMWARES:
        raise BuildError(f"firmware {firmware!r}: use one of {', '.join(FIRMWARES)}")
    loaded = load_scenario(find_scenario(scenario, IMAGES))
    if os.geteuid() != 0:
        raise BuildError("the Debian base needs root (mmdebstrap, chroot, dpkg -i into the tree)")
    cache = Cache((cache_dir or default_cache_dir()).resolve(), log)
    cache.root.mkdir(parents=True, exist_ok=True)
    if image is not None:
        from . import userimage

        require("qemu-img", "qemu-system-x86_64", "debugfs", "mkfs.ext4")
        image_dir = userimage.stage_user_image(cache, image, firmware, log)
        found = userimage.found_image(image_dir)
        firmware, release = found.firmware, found.kernel_release
        machine = userimage.user_machine(image_dir)
        sensor_dir = userimage.scenario_sensor(cache, loaded, release)
        grubenv, base_name = found.grubenv, str(image)
    else:
        firmware = firmware or "bios"
        require(*REQUIRED_TOOLS, *(UEFI_TOOLS if firmware == "uefi" else ()))
        tree = stage_tree(cache, firmware)
        deb, sensor_dir = stage_vendor_package(cache, tree)
        base = stage_base(cache, tree, deb, firmware, encrypted)
        release = json.loads((base / "base.json").read_text())["kernel_release"]
        machine = base_machine(base, tree, firmware)
        grubenv, base_name = (BOOT_PART, "grub/grubenv"), "debian"
    provisioned = stage_provisioned(cache, machine, firmware, log, panic_on_oops)
    volume_key = machine.volumes.get(machine.root_part)
    disk_dir = stage_scenario_disk(cache, provisioned, loaded, sensor_dir, release, volume_key)
    return DebianImage(
        scenario=loaded.name,
        image=disk_dir / "disk.img",
        manifest=disk_dir / "manifest.json",
        kernel_release=release,
        device_id=machine.device_id,
        server_key=provisioned / "server.key",
        device_key=provisioned / "device.key",
        firmware=firmware,
        expect=loaded.expect.model_dump(),
        panic_on_oops=panic_on_oops,
        root_part=machine.root_part,
        grubenv=grubenv,
        base=base_name,
        tpm_key=machine.tpm_key,
        volume_key=machine.dir / "volume.key" if machine.encrypted else None,
        escrow_key=provisioned / "escrow.key" if machine.encrypted else None,
        escrow_message=provisioned / "escrow-message.json" if machine.encrypted else None,
    )
