#!/bin/sh
# Test initramfs /init for the sensor driver crash captures.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "init: up, cmdline: $(cat /proc/cmdline)"

# ramoops parameters are taken from the kernel command line (busybox insmod,
# unlike modprobe, does not read /proc/cmdline itself).
RAMOOPS_ARGS=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        ramoops.*) RAMOOPS_ARGS="$RAMOOPS_ARGS ${arg#ramoops.}" ;;
    esac
done
if [ -n "$RAMOOPS_ARGS" ]; then
    insmod /lib/modules/reed_solomon.ko
    insmod /lib/modules/ramoops.ko $RAMOOPS_ARGS
    mount -t pstore pstore /sys/fs/pstore
    if ls /sys/fs/pstore/dmesg-ramoops-* >/dev/null 2>&1; then
        for f in /sys/fs/pstore/*; do
            echo "=== pstore: $f ==="
            cat "$f"
            echo "=== end pstore: $f ==="
        done
        echo "init: previous crash found in pstore, not loading sensor"
        poweroff -f
    fi
fi

case " $(cat /proc/cmdline) " in
    *" qmr.test=null "*) echo "init: loading nullderef.ko"; insmod /lib/modules/nullderef.ko ;;
    *" qmr.test=hang "*) echo "init: loading sensor.ko hang=1"; insmod /lib/modules/sensor.ko hang=1 ;;
    *" qmr.test=initexit "*) echo "init: exiting"; exit 3 ;;
    *" qmr.test=panic "*) echo "init: loading sensor.ko strict=1"; insmod /lib/modules/sensor.ko strict=1 ;;
    *" qmr.test=warn "*|*" qmr.test=bug "*|*" qmr.test=divide "*|*" qmr.test=hung "*)
        kind=$(sed -n 's/.* qmr\.test=\([a-z]*\).*/\1/p' /proc/cmdline)
        if [ "$kind" = hung ]; then
            # The hung task detector reports a task in state D after 120 s by default;
            # 5 s makes it fire within seconds of the module's wait.
            echo 5 > /proc/sys/kernel/hung_task_timeout_secs
            echo "init: hung_task_timeout_secs=$(cat /proc/sys/kernel/hung_task_timeout_secs)"
        fi
        echo "init: loading crashkinds.ko kind=$kind"
        insmod /lib/modules/crashkinds.ko kind="$kind"
        echo "init: insmod crashkinds.ko returned $?"
        poweroff -f ;;
esac

echo "init: loading sensor.ko"
insmod /lib/modules/sensor.ko
echo "init: insmod sensor.ko returned $?"
poweroff -f
