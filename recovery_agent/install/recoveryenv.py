"""The recovery environment, built on the device from its own kernel with Debian's mkinitramfs.

GRUB's recovery entry boots ``/boot/qmr/vmlinuz`` (a copy of the newest installed kernel, so
removing that kernel package does not take recovery with it) with ``/boot/qmr/initrd.img``.
That initramfs is Debian's own (``mkinitramfs`` with udev, kmod, busybox and the machine's
drivers) plus, from a configuration directory of ours (``/opt/qmr/initramfs``, given to
``mkinitramfs -d``; nothing in ``/etc/initramfs-tools`` changes):

- ``hooks/qmr`` (``files/initramfs-hook.sh``): Debian's python3.11 and a pruned standard
  library, the agent's virtual environment and launcher, the settings
  (``/etc/recovery/recovery.json`` becomes the initramfs' ``/etc/recovery/agent.json``);
- ``scripts/qmr`` (``files/recovery-boot.sh``): the boot method ``boot=qmr`` selects; Debian's
  ``/init`` calls its ``mountroot``, which mounts the OS disk, brings up the network, runs the
  agent and reboots (or powers off when a person must look);
- ``recovery-env.conf``: the UUIDs of the OS root and /boot, the pstore modules to load;
- ``modules``: what the environment loads early besides the machine's drivers (the pstore
  backend: ``efi_pstore`` on UEFI, ``ramoops`` on BIOS; ext4).

:func:`build` writes these, runs ``mkinitramfs`` for the chosen kernel into a temporary name
and moves the results into place only when all went well, so a failed rebuild (a kernel
upgrade with a full /boot) leaves the previous recovery environment bootable. The kernel hooks
(``/etc/kernel/postinst.d/zz-qmr-recovery``, ``postrm.d``) call it through ``recovery-agent
recovery-env`` whenever a kernel package comes or goes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .manifest import write_atomic
from .paths import (
    LAUNCHER,
    RECOVERY_CONFDIR,
    RECOVERY_DIR,
    RECOVERY_INITRD,
    RECOVERY_KERNEL,
    RECOVERY_SETTINGS,
    RECOVERY_VERSION,
    VENV,
)
from .target import InstallError, Target

Say = Callable[[str], None]

# pstore backend per firmware (loaded early in the OS and in the recovery environment).
PSTORE_MODULES = {"uefi": ["efi_pstore"], "bios": ["reed_solomon", "ramoops"]}


def data_file(name: str) -> str:
    """A file of ours shipped with the package (``recovery_agent/install/files``)."""
    return resources.files("recovery_agent.install").joinpath("files", name).read_text()


@dataclass(frozen=True)
class RecoveryEnvConfig:
    """What the recovery environment is built with (kept in /etc/recovery/install.json)."""

    firmware: str
    root_uuid: str
    boot_uuid: str | None  # None: /boot is on the root filesystem
    python: str  # "3.11"
    modules: str = "most"  # mkinitramfs MODULES= (most: every storage and network driver)
    extra_modules: tuple[str, ...] = ()
    root_luks_uuid: str | None = None  # the OS root is on this LUKS2 volume: the agent opens it

    @property
    def load_modules(self) -> list[str]:
        luks = ["dm_crypt", "xts"] if self.root_luks_uuid else []
        return [*PSTORE_MODULES[self.firmware], "ext4", *luks, *self.extra_modules]


def confdir_files(cfg: RecoveryEnvConfig, compress: str) -> dict[str, tuple[str, int]]:
    """The mkinitramfs configuration directory: relative name -> (text, mode)."""
    boot = f'"UUID={cfg.boot_uuid}"' if cfg.boot_uuid else '""'
    return {
        "initramfs.conf": (
            "# Quick Machine Recovery: mkinitramfs settings of the recovery environment (generated\n"
            "# by recovery-agent; rebuilt from /etc/recovery/install.json).\n"
            f"MODULES={cfg.modules}\nBUSYBOX=y\nKEYMAP=n\nCOMPRESS={compress}\nDEVICE=\n"
            "NFSROOT=auto\nRUNSIZE=10%\nFSTYPE=auto\n",
            0o644,
        ),
        "modules": (
            "# loaded early in the recovery environment\n" + "\n".join(cfg.load_modules) + "\n",
            0o644,
        ),
        "qmr.conf": (
            f"QMR_PYTHON=python{cfg.python}\nQMR_VENV=/{VENV}\nQMR_LAUNCHER=/{LAUNCHER}\n"
            f"QMR_SETTINGS=/{RECOVERY_SETTINGS}\n",
            0o644,
        ),
        "recovery-env.conf": (
            f'QMR_ROOT="UUID={cfg.root_uuid}"\nQMR_BOOT={boot}\nQMR_MODULES="{" ".join(cfg.load_modules)}"\n'
            f'QMR_ROOT_LUKS="{"UUID=" + cfg.root_luks_uuid if cfg.root_luks_uuid else ""}"\n',
            0o644,
        ),
        "hooks/qmr": (data_file("initramfs-hook.sh"), 0o755),
        "scripts/qmr": (data_file("recovery-boot.sh"), 0o644),
    }


def write_confdir(target: Target, cfg: RecoveryEnvConfig) -> Path:
    confdir = target.path(RECOVERY_CONFDIR)
    if confdir.exists():
        shutil.rmtree(confdir)
    compress = "zstd" if target.has("usr/bin/zstd") else "gzip"
    for rel, (text, mode) in confdir_files(cfg, compress).items():
        path = confdir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text.encode(), mode)
    return confdir


def built_release(target: Target) -> str | None:
    """The kernel release the recovery environment on /boot was built from, if any."""
    try:
        text = target.path(RECOVERY_VERSION).read_text().strip()
    except OSError:
        return None
    if not (target.path(RECOVERY_KERNEL).is_file() and target.path(RECOVERY_INITRD).is_file()):
        return None
    return text or None


def build(target: Target, cfg: RecoveryEnvConfig, say: Say, release: str | None = None) -> str:
    """Build the recovery environment from ``release`` (default: the newest kernel) into
    /boot/qmr; return the release."""
    releases = target.kernel_releases()
    if release is None:
        if not releases:
            raise InstallError("no kernel to build the recovery environment from: install linux-image-amd64")
        release = releases[0]
    elif release not in releases:
        raise InstallError(f"kernel {release} is not installed (no /boot/vmlinuz-{release} with its modules)")
    confdir = write_confdir(target, cfg)
    out = target.path(RECOVERY_DIR)
    out.mkdir(parents=True, exist_ok=True)
    new_initrd = out / "initrd.img.new"
    new_kernel = out / "vmlinuz.new"
    try:
        target.run(
            [
                "/usr/sbin/mkinitramfs",
                "-d",
                "/" + str(confdir.relative_to(target.root)),
                "-o",
                "/" + str(new_initrd.relative_to(target.root)),
                release,
            ]
        )
        if not new_initrd.is_file():
            raise InstallError(f"mkinitramfs made no {new_initrd}")
        shutil.copyfile(target.path(f"boot/vmlinuz-{release}"), new_kernel)
        for path in (new_initrd, new_kernel):
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        os.replace(new_kernel, target.path(RECOVERY_KERNEL))
        os.replace(new_initrd, target.path(RECOVERY_INITRD))
        write_atomic(target.path(RECOVERY_VERSION), f"{release}\n".encode(), 0o644)
    finally:
        new_initrd.unlink(missing_ok=True)
        new_kernel.unlink(missing_ok=True)
    size = target.path(RECOVERY_INITRD).stat().st_size
    say(f"recovery environment: /{RECOVERY_DIR} from kernel {release} (initramfs {size / 1e6:.1f} MB)")
    return release


def rebuild_for_kernel_change(
    target: Target, cfg: RecoveryEnvConfig, changed: str | None, say: Say
) -> str | None:
    """A kernel package came or went (``changed``): rebuild from the newest kernel unless the
    recovery environment is built from it already. Returns the release built, or None."""
    releases = target.kernel_releases()
    if not releases:
        say("recovery environment: no kernel left to build from; the one on /boot stays")
        return None
    newest = releases[0]
    if built_release(target) == newest and changed != newest:
        say(f"recovery environment: already built from the newest kernel {newest}")
        return None
    return build(target, cfg, say, newest)
