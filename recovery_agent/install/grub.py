"""GRUB's part of an install: boot counting and the recovery entry, the Debian way.

Debian's ``update-grub`` remakes ``/boot/grub/grub.cfg`` from the scripts in ``/etc/grub.d``
(run in name order, their output concatenated) with the settings of ``/etc/default/grub`` and
``/etc/default/grub.d/*.cfg``. So the install changes no file GRUB or Debian own; it adds:

- ``/etc/grub.d/45_qmr`` (:func:`dropin_script`): prints :data:`COUNTING` (the same counting
  as the lab's ``images/grub/grub.cfg``, docs/boot-counting.md: ``load_env``, an if/elif chain
  that bumps ``boot_count``, ``save_env``; at ``boot_limit`` or when ``save_env`` fails the
  recovery entry), makes the recovery entry the default when counting says so, prints
  ``QMR-GRUB entry=<os|recovery> boot_count=<n>`` on the console, and the recovery entry itself
  (:data:`~.paths.RECOVERY_ENTRY`), booting the recovery environment's kernel and initramfs
  from ``/boot/qmr`` with ``boot=qmr``. It sits after ``10_linux``, so Debian's entries keep
  their numbers (``GRUB_DEFAULT=0`` still means the newest kernel); the default is a variable
  GRUB reads only once the whole file ran. Without a built recovery environment it prints
  nothing, so a machine is never sent to an entry that is not there.
- ``/etc/default/grub.d/qmr.cfg`` (:func:`defaults_snippet`): the kernel arguments every entry
  needs: ``panic=N`` (Debian's kernel waits forever after a panic; the machine must reboot for
  the failed boot to count), ``oops=panic`` if the fleet wants a driver's oops to count as a
  failed boot at once, and on BIOS machines ramoops' memory region (the crash log survives the
  reboot in RAM; UEFI machines keep it in EFI variables instead).

The count itself lives in ``/boot/grub/grubenv`` (``$prefix/grubenv``, the file
``grub-editenv`` and ``load_env`` use by default): ``boot_count`` and ``boot_limit``, set in
place by the install (:func:`grubenv_values`).
"""

from __future__ import annotations

from .paths import RECOVERY_DIR, RECOVERY_ENTRY

# The boot counting GRUB runs on every boot: identical to images/grub/grub.cfg's (a test
# compares them). In: grubenv's boot_count and boot_limit. Out: qmr_entry (os or recovery),
# and boot_count one higher in grubenv when the OS is to be booted.
COUNTING = """\
load_env boot_count boot_limit
if [ -z "$boot_limit" ]; then set boot_limit=2; fi
if [ -z "$boot_count" ]; then set boot_count=0; fi

set qmr_entry=os
if [ "$boot_count" -ge "$boot_limit" ]; then set qmr_entry=recovery
elif [ "$boot_count" = 0 ]; then set boot_count=1
elif [ "$boot_count" = 1 ]; then set boot_count=2
elif [ "$boot_count" = 2 ]; then set boot_count=3
elif [ "$boot_count" = 3 ]; then set boot_count=4
elif [ "$boot_count" = 4 ]; then set boot_count=5
elif [ "$boot_count" = 5 ]; then set boot_count=6
elif [ "$boot_count" = 6 ]; then set boot_count=7
elif [ "$boot_count" = 7 ]; then set boot_count=8
elif [ "$boot_count" = 8 ]; then set boot_count=9
else
    # Not a number GRUB can count on (or past the chain): trust nothing, recover.
    set qmr_entry=recovery
fi

if [ "$qmr_entry" = os ]; then
    # A boot that cannot be counted could loop forever: boot recovery instead.
    if save_env boot_count; then
        set qmr_saved=yes
    else
        echo "QMR-GRUB save_env failed"
        set qmr_entry=recovery
    fi
fi
"""

# The highest boot_limit the chain can count to.
MAX_BOOT_LIMIT = 9

# ramoops' region on BIOS machines (the lab's, docs/boot-counting.md): 1 MiB at 127 MiB.
RAMOOPS_ADDRESS = 0x7F00000
RAMOOPS_SIZE = 0x100000
RAMOOPS_RECORD_SIZE = 0x20000


def kernel_args(
    firmware: str, panic_s: int, panic_on_oops: bool, ramoops_address: int = RAMOOPS_ADDRESS
) -> str:
    """The kernel arguments the install adds to every entry, as they must read in grub.cfg
    (a ``$`` escaped for GRUB)."""
    args = [f"panic={panic_s}"]
    if panic_on_oops:
        args.append("oops=panic")
    if firmware == "bios":
        args += [
            f"memmap={RAMOOPS_SIZE >> 20}M\\${ramoops_address:#x}",
            f"ramoops.mem_address={ramoops_address:#x}",
            f"ramoops.mem_size={RAMOOPS_SIZE:#x}",
            f"ramoops.record_size={RAMOOPS_RECORD_SIZE:#x}",
        ]
    return " ".join(args)


def defaults_snippet(args: str) -> str:
    """``/etc/default/grub.d/qmr.cfg``: sourced by ``update-grub`` after /etc/default/grub.
    ``args`` as they must read in grub.cfg; the shell file escapes them once more."""
    shell = args.replace("\\", "\\\\").replace("$", "\\$").replace('"', '\\"')
    return (
        "# Quick Machine Recovery (written by `recovery-agent install`, removed by uninstall).\n"
        "# Kernel arguments for every entry: panic=N reboots a panicked kernel so GRUB counts\n"
        "# the failed boot; oops=panic (if set) makes a driver's oops such a failed boot; on BIOS\n"
        "# machines memmap= and ramoops.* keep the crash log in RAM across the reboot.\n"
        f'GRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX {shell}"\n'
    )


def dropin_script() -> str:
    """``/etc/grub.d/45_qmr``: run by update-grub; prints the counting and the recovery entry."""
    return f"""\
#!/bin/sh
# Quick Machine Recovery: boot counting and the recovery entry (docs/boot-counting.md).
# Written by `recovery-agent install`, removed by `recovery-agent uninstall`. update-grub
# runs it and puts what it prints into /boot/grub/grub.cfg, after Debian's own entries.
set -e

prefix="/usr"
exec_prefix="/usr"
datarootdir="/usr/share"
. "$pkgdatadir/grub-mkconfig_lib"

# QMR_DIR: where the recovery environment is (tests point it elsewhere).
QMR_DIR=${{QMR_DIR:-{"/" + RECOVERY_DIR}}}
if [ ! -f "$QMR_DIR/vmlinuz" ] || [ ! -f "$QMR_DIR/initrd.img" ]; then
    echo "Quick Machine Recovery: no recovery environment in $QMR_DIR (make it with" \\
        "recovery-agent recovery-env); no boot counting" >&2
    exit 0
fi
echo "Found Quick Machine Recovery environment: $QMR_DIR" >&2

device=$(${{grub_probe}} --target=device "$QMR_DIR/vmlinuz")
kernel=$(make_system_path_relative_to_its_root "$QMR_DIR/vmlinuz")
initrd=$(make_system_path_relative_to_its_root "$QMR_DIR/initrd.img")

cat <<'EOF'
### Quick Machine Recovery: count this boot; after boot_limit failed ones, recover ###
{COUNTING}
if [ "$qmr_entry" = recovery ]; then set default={RECOVERY_ENTRY}; fi
echo "QMR-GRUB entry=$qmr_entry boot_count=$boot_count"
EOF

echo "menuentry 'Quick Machine Recovery' --id {RECOVERY_ENTRY} {{"
prepare_grub_to_access_device "$device" | sed -e "s/^/\\t/"
printf '\\tlinux %s boot=qmr %s\\n' "$kernel" "$GRUB_CMDLINE_LINUX"
printf '\\tinitrd %s\\n' "$initrd"
echo "}}"
echo "### end of Quick Machine Recovery ###"
"""


def grubenv_values(boot_limit: int) -> dict[str, str]:
    """The variables the install sets in grubenv: no failed boot yet, and the limit."""
    return {"boot_count": "0", "boot_limit": str(boot_limit), "recovery_attempts": "0"}
