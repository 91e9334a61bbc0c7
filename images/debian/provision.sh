#!/bin/sh
# The lab's provisioning boot of a Debian image (recovery_lab/build/debian.py and, for a
# user's own image, recovery_lab/build/userimage.py).
#
# Run once, inside the VM, by qmr-lab-provision.service from the bundle disk (/dev/vdb,
# mounted read-only at /mnt/bundle): first what Debian's installer would have done (GRUB into
# the disk's boot code, grub.cfg) unless the image has its own GRUB (GRUB_INSTALL=no), then
# the project's own installer, exactly as a fleet admin runs it (no file of ours is placed by
# the lab), unless only GRUB was asked for (INSTALL_QMR=no: the lab's example of a user's
# image), then the lab's provisioning unit removes itself and the machine powers off.
# Console markers: QMR-PROVISION-STEP <what>, QMR-PROVISIONED.
set -eu
cd /mnt/bundle
GRUB_INSTALL=yes
INSTALL_QMR=yes
. ./provision.conf    # FIRMWARE, INSTALL_ARGS, and GRUB_INSTALL, INSTALL_QMR if not yes

if [ "$GRUB_INSTALL" = yes ]; then
    echo "QMR-PROVISION-STEP grub-install ($FIRMWARE)"
    if [ "$FIRMWARE" = uefi ]; then
        grub-install --target=x86_64-efi --efi-directory=/boot/efi --removable --no-nvram
    else
        grub-install --target=i386-pc /dev/vda
    fi
    echo "QMR-PROVISION-STEP update-grub"
    update-grub
fi

if [ "$INSTALL_QMR" = yes ]; then
    echo "QMR-PROVISION-STEP recovery-agent install"
    start=$(cut -d' ' -f1 /proc/uptime)
    # shellcheck disable=SC2086
    python3 -m recovery_agent.install install --wheels wheels --settings settings.json \
        --firmware "$FIRMWARE" $INSTALL_ARGS
    end=$(cut -d' ' -f1 /proc/uptime)
    echo "QMR-PROVISION-STEP install took $start..$end s of uptime"
fi

# The lab's own scaffolding goes: the image keeps only Debian, the vendor's driver and QMR.
rm -f /etc/systemd/system/multi-user.target.wants/qmr-lab-provision.service \
    /etc/systemd/system/qmr-lab-provision.service
sync
echo "QMR-PROVISIONED"
