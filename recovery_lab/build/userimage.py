"""Bring your own image: the lab on a user's own disk image of a Debian-family system.

``recovery-lab build|run SCENARIO --base debian --image PATH`` (raw or qcow2) takes the image
through cached stages, keyed by the image's sha256::

    user-image      a raw copy of the image (``qemu-img convert``; the user's file is only
                    read); its partition table read (MBR or GPT); its root filesystem found
                    (the ext4 partition whose os-release says Debian or ID_LIKE=debian), its
                    /boot and EFI system partition found from the root's fstab; its newest
                    kernel, its libc and its GRUB (grub-pc: BIOS; grub-efi-amd64: UEFI) read
                    from its dpkg database; then, written with debugfs (no mount), the lab's
                    test harness: the provisioning unit (it removes itself) and a serial
                    console for GRUB and the kernel (the lab follows the boot there)
    debian-qmr      the provisioning boot, as on the lab's own Debian base, except that GRUB
                    is the image's own (no grub-install): the project's installer runs, as an
                    admin runs it, and makes the device key on the machine
    debian-disk     per scenario: the scenario's files changed on the root filesystem

What the image must be (each is checked, and a missing one named with its fix): a whole disk
with an MBR or a GPT; the root on ext4, cleanly unmounted; ``/boot`` on the root or on its own
ext4 partition named in fstab by UUID, LABEL or PARTUUID; a kernel with its initramfs; GRUB
installed on the disk; Debian's ``python3`` (the agent runs on it); and a network the
machine brings up by DHCP on QEMU's virtio network card (the server is reached there).

:func:`make_example_image` makes such an image as a user would have one (a GPT disk, /boot on
the root, GRUB installed by the machine itself, the vendor's driver package installed and no
QMR): the test of this path, and a starting point for a user (``recovery-lab example-image``).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from recovery_agent.digest import sha256_file

from .. import disk
from ..disk import Partition
from ..inspect import DiskImage
from ..scenario import Scenario, ScenarioError
from ..tools import require, run
from . import debian
from .cache import BuildError, Cache, Log, files_hash
from .kernel import resolve_kernel, stage_kernel, stage_sensor

EXT4_MAGIC = 0xEF53
EXT4_INCOMPAT_RECOVER = 0x4  # the journal holds writes not yet replayed
SUPPORTED_FORMATS = ("raw", "qcow2")


class ImageError(BuildError):
    """A user's image the lab cannot take, with what to change."""


@dataclass(frozen=True)
class Ext4Info:
    uuid: str
    label: str
    needs_recovery: bool


def ext4_superblock(image: Path, part: Partition) -> Ext4Info | None:
    """The ext4 superblock's UUID, label and journal state, or None if the partition does not
    hold an ext2/3/4 filesystem."""
    with open(image, "rb") as f:
        f.seek(part.offset + 1024)
        sb = f.read(1024)
    if len(sb) < 1024 or struct.unpack_from("<H", sb, 0x38)[0] != EXT4_MAGIC:
        return None
    incompat = struct.unpack_from("<I", sb, 0x60)[0]
    label = sb[0x78:0x88].split(b"\0")[0].decode("utf-8", "replace")
    return Ext4Info(str(uuid.UUID(bytes=sb[0x68:0x78])), label, bool(incompat & EXT4_INCOMPAT_RECOVER))


def _release_key(release: str) -> tuple[tuple[int, str], ...]:
    return tuple((int(p), "") if p.isdecimal() else (-1, p) for p in re.split(r"(\d+)", release) if p)


def dpkg_installed(status: str) -> dict[str, str]:
    """Installed packages and their versions, from the text of /var/lib/dpkg/status."""
    found: dict[str, str] = {}
    for stanza in status.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): ?(.*)$", stanza, re.M))
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            found[fields["Package"]] = fields.get("Version", "")
    return found


def fstab_mounts(text: str) -> dict[str, str]:
    """mount point -> the filesystem fstab names for it (``UUID=...``, ``/dev/...``)."""
    mounts = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2:
            mounts[fields[1]] = fields[0]
    return mounts


@dataclass(frozen=True)
class FoundImage:
    """What the lab read from a user's image."""

    table: str  # mbr or gpt
    root_part: int
    root_uuid: str
    boot_part: int | None  # None: /boot is a folder on the root
    firmware: str
    kernel_release: str
    libc: str
    os_name: str

    @property
    def grubenv(self) -> tuple[int, str]:
        """(partition, path) of GRUB's grubenv."""
        if self.boot_part is None:
            return self.root_part, "boot/grub/grubenv"
        return self.boot_part, "grub/grubenv"


def examine(raw: Path, firmware: str | None = None) -> FoundImage:
    """Find the root, /boot, the kernel and the firmware of a raw disk image; raise
    :class:`ImageError` naming what is missing. ``firmware``: as asked (checked against the
    image's GRUB), or found."""
    try:
        table, parts = disk.read_partitions(raw)
    except disk.DiskError as exc:
        raise ImageError(f"{raw}: {exc}: the lab takes a whole disk image with an MBR or a GPT") from None
    if not parts:
        raise ImageError(f"{raw} has no partitions: the lab takes a whole disk, not one filesystem")
    supers = {p.number: sb for p in parts if (sb := ext4_superblock(raw, p)) is not None}
    with DiskImage(raw) as d:
        root_part: int | None = None
        os_name = ""
        for number in sorted(supers):
            text = d.ext4_file(number, "usr/lib/os-release") or d.ext4_file(number, "etc/os-release")
            if text is None:
                continue
            info = dict(re.findall(r'^(\w+)="?([^"\n]*)"?$', text.decode("utf-8", "replace"), re.M))
            if info.get("ID") == "debian" or "debian" in info.get("ID_LIKE", "").split():
                root_part = number
                os_name = str(info.get("PRETTY_NAME") or info.get("NAME") or info.get("ID") or "?")
                break
        if root_part is None:
            raise ImageError(
                f"{raw}: no ext4 partition holds a Debian-family system (os-release with ID=debian or "
                f"ID_LIKE=debian; ext4 partitions: {sorted(supers) or 'none'}): the lab takes Debian, "
                "Ubuntu and their kin with the root on ext4"
            )
        if supers[root_part].needs_recovery:
            raise ImageError(
                f"{raw}: the root filesystem (partition {root_part}) was not cleanly unmounted: its "
                "journal holds writes. Shut the machine down cleanly (or run e2fsck on the image) first"
            )
        fstab = fstab_mounts((d.ext4_file(root_part, "etc/fstab") or b"").decode("utf-8", "replace"))
        boot_part = _boot_partition(raw, parts, supers, fstab.get("/boot"), root_part)
        boot_fs, boot_dir = (root_part, "boot") if boot_part is None else (boot_part, "")
        names = d.ext4_listdir(boot_fs, boot_dir)
        kernels = sorted(
            (n.removeprefix("vmlinuz-") for n in names if n.startswith("vmlinuz-")),
            key=_release_key,
            reverse=True,
        )
        with_modules = [r for r in kernels if d.ext4_listdir(root_part, f"lib/modules/{r}")]
        if not with_modules:
            raise ImageError(
                f"{raw}: no kernel in /boot with its modules in /lib/modules "
                f"(found {kernels or 'no vmlinuz-*'}): install a linux-image package in the image"
            )
        release = with_modules[0]
        if f"initrd.img-{release}" not in names:
            raise ImageError(
                f"{raw}: kernel {release} has no /boot/initrd.img-{release}: run update-initramfs -u"
            )
        packages = dpkg_installed(
            (d.ext4_file(root_part, "var/lib/dpkg/status") or b"").decode("utf-8", "replace")
        )
        grubs = [fw for fw, pkg in (("bios", "grub-pc"), ("uefi", "grub-efi-amd64")) if pkg in packages]
        if firmware is None:
            if len(grubs) != 1:
                which = "both grub-pc and grub-efi-amd64" if grubs else "neither grub-pc nor grub-efi-amd64"
                raise ImageError(
                    f"{raw}: cannot tell how the image boots ({which} installed): "
                    "pass --firmware bios or --firmware uefi"
                )
            firmware = grubs[0]
        elif firmware not in grubs:
            want = "grub-pc" if firmware == "bios" else "grub-efi-amd64"
            raise ImageError(f"{raw}: --firmware {firmware}, but {want} is not installed in the image")
        grub_dir = "i386-pc" if firmware == "bios" else "x86_64-efi"
        grub_at = (root_part, "boot/grub") if boot_part is None else (boot_part, "grub")
        if grub_dir not in d.ext4_listdir(*grub_at):
            raise ImageError(
                f"{raw}: GRUB ({grub_dir}) was never installed on this disk (no /boot/grub/{grub_dir}): "
                "run grub-install and update-grub in the machine first"
            )
        if "python3" not in packages:
            raise ImageError(
                f"{raw}: Debian's python3 is not installed (the agent runs on it; python3-minimal has no "
                "asyncio): apt-get install python3 in the image"
            )
        if "libc6" not in packages:
            raise ImageError(f"{raw}: no libc6 in the image's dpkg database")
    return FoundImage(
        table=table,
        root_part=root_part,
        root_uuid=supers[root_part].uuid,
        boot_part=boot_part,
        firmware=firmware,
        kernel_release=release,
        libc=packages["libc6"],
        os_name=os_name,
    )


def _boot_partition(
    raw: Path, parts: list[Partition], supers: dict[int, Ext4Info], spec: str | None, root_part: int
) -> int | None:
    """The partition fstab mounts at /boot, or None when /boot is on the root."""
    if spec is None:
        return None
    key, _, value = spec.partition("=")
    for number, sb in supers.items():
        if (key == "UUID" and sb.uuid == value.lower()) or (key == "LABEL" and sb.label == value):
            if number == root_part:
                break
            return number
    else:
        if key == "PARTUUID":
            guid_of = _partition_guids(raw)
            for number in supers:
                if guid_of.get(number) == value.lower():
                    return number
        raise ImageError(
            f"{raw}: fstab mounts /boot from {spec}, which the lab cannot match to an ext4 partition of "
            "the image: name it by UUID=, LABEL= or PARTUUID= (as Debian's installer does)"
        )
    raise ImageError(f"{raw}: fstab mounts /boot from the root filesystem itself")


def _partition_guids(raw: Path) -> dict[int, str]:
    """GPT unique partition GUIDs, or MBR ``SIGNATURE-NN`` PARTUUIDs, by partition number."""
    info = json.loads(run(["sfdisk", "--json", raw]))["partitiontable"]
    found = {}
    for i, p in enumerate(info.get("partitions", []), start=1):
        m = re.search(r"(\d+)$", p["node"])
        number = int(m[1]) if m else i
        if "uuid" in p:
            found[number] = p["uuid"].lower()
        elif "id" in info:
            found[number] = f"{info['id'].lower().removeprefix('0x')}-{number:02x}"
    return found


def debugfs_write(fs: str, files: dict[str, tuple[bytes, int]], links: dict[str, str], scratch: Path) -> None:
    """Write ``files`` (path -> (bytes, mode)) and symlinks (path -> target) into an ext4
    filesystem with debugfs, making missing folders; what exists is replaced."""
    cmds: list[str] = []
    made: set[str] = set()

    def folders(path: str) -> None:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            folder = "/" + "/".join(parts[:i])
            if folder not in made:
                made.add(folder)
                if "Inode:" not in run(["debugfs", "-R", f"stat {folder}", fs]):
                    cmds.append(f"mkdir {folder}")

    for i, (path, (data, mode)) in enumerate(sorted(files.items())):
        local = scratch / f"file-{i}"
        local.write_bytes(data)
        folders(path)
        if "Inode:" in run(["debugfs", "-R", f"stat {path}", fs]):
            cmds.append(f"rm {path}")
        cmds += [f"write {local} {path}", f"sif {path} mode 0{0o100000 | mode:o}"]
    for path, target in sorted(links.items()):
        folders(path)
        if "Inode:" in run(["debugfs", "-R", f"stat {path}", fs]):
            cmds.append(f"rm {path}")
        cmds.append(f"symlink {path} {target}")
    script = scratch / "cmds"
    script.write_text("\n".join(cmds) + "\n")
    run(["debugfs", "-w", "-f", script, fs])


def _format(image: Path) -> str:
    info = json.loads(run(["qemu-img", "info", "--output=json", image]))
    fmt = str(info.get("format", ""))
    if fmt not in SUPPORTED_FORMATS:
        raise ImageError(
            f"{image} is a {fmt or 'unknown'} image: the lab takes raw or qcow2 (qemu-img convert it)"
        )
    if info.get("backing-filename"):
        raise ImageError(f"{image} has a backing file: flatten it first (qemu-img convert -O qcow2)")
    return fmt


def stage_user_image(cache: Cache, image: Path, firmware: str | None, log: Log) -> Path:
    """``disk.img`` (raw), ``vmlinuz``, ``initrd.img`` and ``image.json`` (the
    :class:`FoundImage`) from a user's image; see the module docstring."""
    image = image.resolve()
    if not image.is_file():
        raise ImageError(f"{image}: no such image file")
    require("qemu-img", "debugfs", "sfdisk")
    fmt = _format(image)
    log(f"[user-image] hashing {image} ({image.stat().st_size / disk.MIB:.0f} MiB)")
    digest = sha256_file(image)

    def build(out: Path) -> None:
        raw = out / "disk.img"
        run(["qemu-img", "convert", "-f", fmt, "-O", "raw", image, raw])
        found = examine(raw, firmware)
        with DiskImage(raw) as d:
            boot_fs, prefix = (found.root_part, "boot/") if found.boot_part is None else (found.boot_part, "")
            for name, rel in (("vmlinuz", "vmlinuz-"), ("initrd.img", "initrd.img-")):
                data = d.ext4_file(boot_fs, prefix + rel + found.kernel_release)
                if data is None:
                    raise ImageError(f"{image}: cannot read /boot/{rel}{found.kernel_release}")
                (out / name).write_bytes(data)
        unit = debian.PROVISION_UNIT
        files = {
            f"/etc/systemd/system/{unit}": ((debian.DEBIAN_RECIPES / unit).read_bytes(), 0o644),
            "/" + debian.SERIAL_CONSOLE_CFG: (
                (debian.DEBIAN_RECIPES / "grub-serial-console.cfg").read_bytes(),
                0o644,
            ),
        }
        links = {f"/etc/systemd/system/multi-user.target.wants/{unit}": f"/etc/systemd/system/{unit}"}
        offset = next(p for p in disk.read_partitions(raw)[1] if p.number == found.root_part).offset
        with tempfile.TemporaryDirectory(dir=out) as scratch:
            debugfs_write(f"{raw}?offset={offset}", files, links, Path(scratch))
        (out / "image.json").write_text(
            json.dumps({"source": str(image), "format": fmt, **asdict(found)}, indent=1) + "\n"
        )

    inputs = {
        "image": digest,
        "firmware": firmware,
        "recipes": files_hash(
            debian.DEBIAN_RECIPES / n for n in (debian.PROVISION_UNIT, "grub-serial-console.cfg")
        ),
    }
    out = cache.stage("user-image", inputs, build, image.name)
    found = found_image(out)
    where = "on the root" if found.boot_part is None else f"on partition {found.boot_part}"
    log(
        f"[user-image] {found.os_name}: {found.table.upper()}, root on partition {found.root_part}, "
        f"/boot {where}, kernel {found.kernel_release}, {found.firmware}"
    )
    return out


def found_image(image_dir: Path) -> FoundImage:
    data = json.loads((image_dir / "image.json").read_text())
    return FoundImage(**{k: data[k] for k in FoundImage.__dataclass_fields__})


def user_machine(image_dir: Path) -> debian.Machine:
    found = found_image(image_dir)
    return debian.Machine(
        image_dir,
        found.root_part,
        found.root_uuid,
        found.libc,
        f"lab-image-{image_dir.name.rsplit('-', 1)[-1][:8]}",
        grub_install=False,
    )


def scenario_sensor(cache: Cache, scenario: Scenario, release: str) -> Path | None:
    """The lab's sensor builds, when the scenario uses them (``sensor:VERSION``): only for an
    image that runs the kernel the lab builds them for."""
    used = sorted({c.source for c in scenario.files if c.source and c.source.startswith("sensor:")})
    if not used:
        return None
    kernel = resolve_kernel()
    if kernel.release != release:
        raise ScenarioError(
            f"{scenario.name}: {', '.join(used)} is the lab's driver built for kernel {kernel.release}, but "
            f'the image runs {release}: build your driver for {release} and name it with source = "file:..."'
        )
    return stage_sensor(cache, stage_kernel(cache, kernel), kernel)


# ------------------------------------------------------------------ the example


EXAMPLE_ROOT_MIB = 3584
EXAMPLE_ESP_MIB = 128
EXAMPLE_DISK_GUID = uuid.UUID("51a2c0de-de12-4000-8000-00000000e0a0")
EXAMPLE_ROOT_UUID = "51a2c0de-de12-4000-8000-00000000e0a2"


def example_layout(firmware: str) -> list[tuple[str, int | str, int]]:
    first = (
        ("bios-boot", disk.GPT_BIOS_BOOT, 1) if firmware == "bios" else ("esp", disk.GPT_EFI, EXAMPLE_ESP_MIB)
    )
    return [first, ("root", disk.GPT_LINUX, EXAMPLE_ROOT_MIB)]


def stage_example(cache: Cache, firmware: str, log: Log) -> Path:
    """``disk.img``: a Debian 12 image as a user would have one (see the module docstring):
    GPT, the root (with /boot) on partition 2, GRUB installed by the machine in a boot of
    its own, the vendor's sensor package, no QMR."""
    tree = debian.stage_tree(cache, firmware)
    deb, _ = debian.stage_vendor_package(cache, tree)
    release = json.loads((tree / "tree.json").read_text())["kernel_release"]
    layout = example_layout(firmware)

    def build(out: Path) -> None:
        work = out / "work"
        root = work / "root"
        work.mkdir()
        run(["cp", "-a", tree / "root", root])
        fstab = f"UUID={EXAMPLE_ROOT_UUID} / ext4 errors=remount-ro 0 1\n"
        if firmware == "uefi":
            vid = debian.ESP_VOLUME_ID
            fstab += f"UUID={vid[:4]}-{vid[4:]} /boot/efi vfat umask=0077 0 1\n"
            (root / "boot/efi").mkdir(exist_ok=True)
        debian.prepare_root(root, fstab, deb)
        shutil.copy(root / "boot" / f"vmlinuz-{release}", out / "vmlinuz")
        shutil.copy(root / "boot" / f"initrd.img-{release}", out / "initrd.img")
        images = {2: work / "root.ext4"}
        debian.mkfs_ext4(root, images[2], EXAMPLE_ROOT_MIB, EXAMPLE_ROOT_UUID, "root")
        if firmware == "uefi":
            images[1] = work / "esp.fat"
            debian.mkfs_esp(images[1], EXAMPLE_ESP_MIB)
        disk.assemble(out / "disk.img", disk.layout(layout), images, None, None, "gpt", EXAMPLE_DISK_GUID)
        shutil.rmtree(work)
        # GRUB, as the machine's own installer would have put it: a boot that runs only
        # Debian's grub-install and update-grub (the lab's provisioning script without QMR).
        bundle = out / "bundle"
        debian.write_script(bundle, firmware, "", grub_install=True, install_qmr=False)
        debian.mkfs_ext4(bundle, out / "bundle.ext4", 16, "51a2c0de-de12-4000-8000-0000000000bc", "qmrbundle")
        shutil.rmtree(bundle)
        machine = debian.Machine(out, 2, EXAMPLE_ROOT_UUID, "", "", grub_install=True)
        debian.provision_boot(machine, out, firmware, log)
        (out / "vmlinuz").unlink()
        (out / "initrd.img").unlink()

    inputs = {
        "tree": tree.name,
        "deb": sha256_file(deb),
        "recipes": files_hash(sorted(debian.DEBIAN_RECIPES.iterdir())),
        "layout": layout,
    }
    return cache.stage("example-image", inputs, build, f"{release}, {firmware}")


def make_example_image(out: Path, cache: Cache, firmware: str = "bios", log: Log = print) -> Path:
    """Write the example user image to ``out`` as qcow2 (made, or taken from the cache)."""
    require(*debian.REQUIRED_TOOLS, *(debian.UEFI_TOOLS if firmware == "uefi" else ()))
    made = stage_example(cache, firmware, log)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", made / "disk.img", tmp])
    tmp.replace(out)
    return out
