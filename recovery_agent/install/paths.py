"""Where ``recovery-agent install`` puts things on a machine, relative to its root.

One spelling serves the installer, the units and hooks it writes, the recovery environment it
builds and the lab that reads an installed image from outside. Nothing here touches a disk.
Debian's conventions decide the places: drop-ins in ``/etc/grub.d`` and
``/etc/default/grub.d`` (``update-grub`` reads them), units in ``/etc/systemd/system``, kernel
hooks in ``/etc/kernel/postinst.d`` and ``postrm.d``, modules in ``/etc/modules-load.d``;
software that is not a Debian package under ``/opt``; state under ``/var/lib``.
"""

from __future__ import annotations

# The agent's own runtime: a virtual environment on Debian's python3, and its launcher.
OPT = "opt/qmr"
VENV = f"{OPT}/venv"
LAUNCHER = "usr/local/sbin/recovery-agent"
# The mkinitramfs configuration the recovery environment is built from (generated).
RECOVERY_CONFDIR = f"{OPT}/initramfs"

# Settings: the agent's (the OS's view), the recovery environment's view of the same, the
# installer's own choices, the device key (made on the device, 0600).
ETC = "etc/recovery"
SETTINGS = f"{ETC}/agent.json"
RECOVERY_SETTINGS = f"{ETC}/recovery.json"
INSTALL_CONFIG = f"{ETC}/install.json"
DEVICE_KEY = f"{ETC}/device.key"
DEVICE_KEY_PUB = f"{ETC}/device.key.pub"

# Health checks: our directories and greenboot's, each with required.d and wanted.d.
CHECK_DIR = f"{ETC}/check"
GREENBOOT_CHECK_DIRS = ("usr/lib/greenboot/check", "etc/greenboot/check")
CHECK_KINDS = ("required.d", "wanted.d")

# GRUB: the drop-in update-grub runs, the kernel arguments it reads, its files on /boot.
GRUB_DROPIN = "etc/grub.d/45_qmr"
GRUB_DEFAULTS_DIR = "etc/default/grub.d"
GRUB_DEFAULTS = f"{GRUB_DEFAULTS_DIR}/qmr.cfg"
GRUB_DIR = "boot/grub"
GRUBENV = f"{GRUB_DIR}/grubenv"
GRUB_CFG = f"{GRUB_DIR}/grub.cfg"

# The recovery environment GRUB's recovery entry boots: the kernel it was built from and
# its initramfs (Python, the agent, its settings), on /boot.
RECOVERY_DIR = "boot/qmr"
RECOVERY_KERNEL = f"{RECOVERY_DIR}/vmlinuz"
RECOVERY_INITRD = f"{RECOVERY_DIR}/initrd.img"
RECOVERY_VERSION = f"{RECOVERY_DIR}/kernel-release"
# A root on LUKS2: the recovery environment signs with a copy of the device key on /boot (0600),
# since the one in /etc is inside the volume it must ask the key for.
RECOVERY_DEVICE_KEY = f"{RECOVERY_DIR}/device.key"
# The id of GRUB's recovery entry.
RECOVERY_ENTRY = "qmr-recovery"

# Kernel hooks: a new or removed kernel rebuilds the recovery environment.
KERNEL_POSTINST = "etc/kernel/postinst.d/zz-qmr-recovery"
KERNEL_POSTRM = "etc/kernel/postrm.d/zz-qmr-recovery"

# Crash records: the pstore backend loaded early, ramoops' region (BIOS).
MODULES_LOAD = "etc/modules-load.d/00-qmr-pstore.conf"
MODPROBE_RAMOOPS = "etc/modprobe.d/qmr-ramoops.conf"
SYSTEMD_PSTORE = "var/lib/systemd/pstore"

# systemd: our units and where enabling links them.
UNIT_DIR = "etc/systemd/system"
UNIT_HEALTH_CHECK = "qmr-health-check.service"
UNIT_MARK_GOOD = "qmr-mark-good.service"
UNIT_HEALTH_REPORT = "qmr-health-report.service"

# The evidence a boot leaves when it failed without a crash record: its kernel log, saved as
# text by the health check that failed (the previous one is kept beside it).
FAILED_BOOT_LOG = "var/lib/recovery/failed-boot.log"

# What the install changed, to put it back (uninstall), and the files it replaced.
INSTALL_STATE = "var/lib/recovery/install"
MANIFEST = f"{INSTALL_STATE}/manifest.json"
BACKUP_DIR = f"{INSTALL_STATE}/backup"

# The recovery environment's view of the machine: the OS root and /boot mounted here.
RECOVERY_OS_ROOT = "/mnt/os"
