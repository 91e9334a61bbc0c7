"""Where things are on a machine's OS root, as the agent reads and writes them.

Paths are relative to the OS root (the broken machine's root filesystem, mounted in the
recovery environment), so one spelling serves the agent, the lab that builds the disks and the
server's catalog. Nothing here touches a disk.
"""

from __future__ import annotations

# The driver store is part of the protocol too: a restore_file may copy only from there.
from .protocol.wire import DRIVER_STORE as DRIVER_STORE

# The agent's own state on the OS disk: quarantined files, intent journals, the directive the
# next healthy boot confirms, crash records archived after a good boot.
STATE_DIR = "var/lib/recovery"
QUARANTINE_DIR = f"{STATE_DIR}/quarantine"
JOURNAL_DIR = f"{STATE_DIR}/journal"
LAST_DIRECTIVE = f"{STATE_DIR}/last-directive"
CONFIRMED_DIRECTIVE = f"{STATE_DIR}/confirmed-directive"
PSTORE_ARCHIVE = f"{STATE_DIR}/pstore"
# Test mode: the records of recovery tests run here (one file per test, written by the test's
# only action: recovery_test), and the grubenv variable that arms a test visit.
RECOVERY_TESTS_DIR = f"{STATE_DIR}/tests"
# Encrypted disks (diskkey.py): the recovery key's escrow made at install, sealed to the server's
# escrow key and signed by the device key (nothing in it opens the disk without the server's
# escrow private key), waiting for the first health report to deliver it; then kept as sent.
ESCROW_PENDING = f"{STATE_DIR}/escrow/pending.json"
ESCROW_SENT = f"{STATE_DIR}/escrow/sent.json"
# The inventory the server last stored for this device (health reports send changes to it).
SENT_INVENTORY = f"{STATE_DIR}/sent-inventory.json"

# Kernel modules: lib/modules/<kernel release>/{extra,updates}/**.ko are out-of-tree drivers.
MODULES_DIRS = ("lib/modules", "usr/lib/modules")
DRIVER_SUBDIRS = ("extra", "updates")
# Known-good driver versions kept on the OS disk: <driver>/<version>/<driver>.ko (DRIVER_STORE,
# imported above).
# Where disable_driver writes its modprobe.d entry.
MODPROBE_DIR = "etc/modprobe.d"

# The sensor's content files (the CrowdStrike shape): C-*.sys.
CHANNEL_DIR = "var/lib/sensor/channels"

# What the OS says about itself. etc/os-release is often a symlink to ../usr/lib/os-release;
# the spec's fallback path lets the agent read it without following the link.
OS_RELEASE_FILES = ("etc/os-release", "usr/lib/os-release")
HOSTNAME_FILE = "etc/hostname"

# The OS's own log of its boot steps (images/os/lib.sh qmr_progress).
BOOT_PROGRESS_LOG = "var/log/boot-progress.log"
