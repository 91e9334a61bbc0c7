#!/bin/sh
# /init of the QEMU harness test guest (tests/qemu_guest.py builds it).
# What it does is chosen by qmr.test=MODE on the kernel command line:
#   split    print a marker line in two writes one second apart, then power off
#   panic    load pvpanic, then crash the kernel (sysrq c); panic=5 reboots the VM
#   watchdog arm the i6300esb watchdog and never feed it; the watchdog resets the VM
#   idle     print a marker and sleep forever (teardown test)
#   (other)  print the healthy marker and power off
# State across resets lives on the first disk, /dev/vda (the run's qcow2 overlay), if there
# is one: the first boot writes a mark at its start; a boot that finds the mark is a boot
# after a reset, prints what pstore holds and powers off, so a crash or watchdog test ends
# by itself after one reset. (Debian's kernel has no PSTORE_CONSOLE/PMSG to keep it in RAM.)
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
MODE=none
RAMOOPS_ARGS=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        qmr.test=*) MODE=${arg#qmr.test=} ;;
        ramoops.*) RAMOOPS_ARGS="$RAMOOPS_ARGS ${arg#ramoops.}" ;;
    esac
done
echo "QMR-TEST init mode=$MODE"
M=/lib/modules
insmod $M/reed_solomon.ko
insmod $M/ramoops.ko $RAMOOPS_ARGS
mount -t pstore pstore /sys/fs/pstore
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
    insmod $M/$m.ko
done
MARK=QMR-BOOTED-MARK
if [ -b /dev/vda ]; then
    if [ "$(head -c 15 /dev/vda)" = "$MARK" ]; then
        echo "QMR-RECOVERY-BEGIN"
        for f in /sys/fs/pstore/*; do [ -e "$f" ] && echo "QMR-PSTORE ${f##*/}"; done
        echo "QMR-RECOVERY-END"
        poweroff -f
    fi
    printf '%s' "$MARK" | dd of=/dev/vda conv=notrunc,fsync 2>/dev/null
    echo "QMR-TEST disk marked rc=$?"
fi
insmod $M/pvpanic.ko
insmod $M/pvpanic-mmio.ko
case "$MODE" in
    split)
        echo 1 > /proc/sys/kernel/printk   # no kernel message in the middle of the line
        printf 'QMR-SPLIT-A'
        sleep 1
        printf 'B-END\n'
        echo "QMR-HEALTHY boot_count=0"
        poweroff -f ;;
    panic)
        echo "QMR-TEST crashing"
        echo c > /proc/sysrq-trigger ;;
    watchdog)
        insmod $M/watchdog.ko
        insmod $M/i6300esb.ko heartbeat=2
        exec 3>/dev/watchdog
        echo "QMR-TEST watchdog armed"
        while :; do sleep 10; done ;;
    idle)
        echo "QMR-TEST idle"
        while :; do sleep 10; done ;;
esac
echo "QMR-HEALTHY boot_count=0"
poweroff -f
