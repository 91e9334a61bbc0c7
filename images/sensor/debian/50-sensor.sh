#!/bin/bash
# The sensor vendor's boot health check (greenboot's required.d: a failure makes the boot bad).
# Good: the driver is loaded and loaded every channel file; or a remediation disabled it
# (a "blacklist sensor" in /etc/modprobe.d), and the machine runs without it.
if cat /etc/modprobe.d/*.conf 2>/dev/null | grep -qx 'blacklist sensor'; then
    echo "sensor disabled by /etc/modprobe.d: the machine runs without it"
    exit 0
fi
if [ ! -d /sys/module/sensor ] || [ "$(cat /sys/module/sensor/initstate 2>/dev/null)" != live ]; then
    echo "sensor driver not loaded ($(cat /sys/module/sensor/initstate 2>/dev/null || echo absent))"
    exit 1
fi
expected=$(find /var/lib/sensor/channels -maxdepth 1 -name 'C-*.sys' | wc -l)
loaded=$(dmesg | sed -n 's/.*sensor: loaded \([0-9]*\) channel files.*/\1/p' | tail -n 1)
if [ "$loaded" != "$expected" ]; then
    echo "sensor loaded ${loaded:-no} of $expected channel files"
    exit 1
fi
echo "sensor loaded, $loaded channel files"
