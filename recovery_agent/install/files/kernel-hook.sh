#!/bin/sh
# Quick Machine Recovery: a kernel was installed or removed; rebuild the recovery environment
# from the newest kernel (written by `recovery-agent install`, removed by uninstall).
# Debian's kernel packages run /etc/kernel/postinst.d/* and postrm.d/* with the kernel
# release as $1; this runs before zz-update-grub (the recovery entry's paths do not change).
set -e
[ -x /usr/local/sbin/recovery-agent ] || exit 0
exec /usr/local/sbin/recovery-agent recovery-env --changed-kernel "$1"
