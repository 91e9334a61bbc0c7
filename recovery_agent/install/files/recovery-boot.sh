# Quick Machine Recovery: the recovery environment, as an initramfs-tools boot method.
# Installed as scripts/qmr of the recovery initramfs by `recovery-agent recovery-env`.
#
# GRUB's recovery entry boots the machine's own kernel with this initramfs and boot=qmr on
# the command line. Debian's /init prepares the machine as for any boot (udev, the modules,
# /dev) and then calls mountroot() from this file, which never returns:
#
#  1. load the pstore backend, mount pstore and print every crash record the failed boots left;
#  2. mount the OS root read-write at /mnt/os and /boot at /mnt/os/boot (their UUIDs are in
#     /etc/recovery/recovery-env.conf) and print GRUB's boot count; an encrypted root
#     (QMR_ROOT_LUKS) is left to the agent, which opens it with the key the server releases
#     (--os-volume): /boot is mounted at /mnt/boot;
#  3. bring up the network (DHCP, initramfs-tools' configure_networking);
#  4. run `recovery-agent run` with the settings built in (/etc/recovery/agent.json);
#  5. unmount cleanly (GRUB and the next boot read these filesystems) and act on the agent's
#     exit code (docs/recovery-loop.md): 12 (out of attempts, a person must look) powers the
#     machine off, any other code reboots into GRUB.
#
# Console markers (the lab reads them): QMR-RECOVERY-BEGIN, QMR-PSTORE <record>,
# QMR-RECOVERY boot_count=<n>, QMR-RECOVERY-AGENT start, QMR-AGENT exit=<code>,
# QMR-RECOVERY-END, QMR-NEEDS-MANUAL.

qmr_wait_device()
{
	# The device of "UUID=..." ($1), waiting up to $2 seconds for udev to make it.
	_i=0
	while [ "$_i" -lt "$2" ]; do
		_dev=$(resolve_device "$1") && { echo "$_dev"; return 0; }
		wait_for_udev 1
		sleep 1
		_i=$((_i + 1))
	done
	return 1
}

qmr_mount_os()
{
	mkdir -p /mnt/os
	if [ -n "${QMR_ROOT_LUKS:-}" ]; then
		# An encrypted OS root: only the agent can open it, with the key the server releases
		# for this visit (recovery_agent/osdisk.py). Here /boot only, at /mnt/boot, seen at
		# /mnt/os/boot until the agent mounts the root there.
		QMR_OS_VOLUME=$(qmr_wait_device "$QMR_ROOT_LUKS" 30) \
			|| { echo "QMR-RECOVERY error: no encrypted OS root $QMR_ROOT_LUKS"; return 1; }
		[ -n "$QMR_BOOT" ] || { echo "QMR-RECOVERY error: an encrypted root needs /boot apart"; return 1; }
		_boot=$(qmr_wait_device "$QMR_BOOT" 30) || { echo "QMR-RECOVERY error: no /boot $QMR_BOOT"; return 1; }
		mkdir -p /mnt/boot
		mount -o rw "$_boot" /mnt/boot || { echo "QMR-RECOVERY error: cannot mount /boot $_boot"; return 1; }
		ln -sfn /mnt/boot /mnt/os/boot
		return 0
	fi
	_root=$(qmr_wait_device "$QMR_ROOT" 30) || { echo "QMR-RECOVERY error: no OS root $QMR_ROOT"; return 1; }
	mount -t ext4 -o rw "$_root" /mnt/os || mount -o rw "$_root" /mnt/os \
		|| { echo "QMR-RECOVERY error: cannot mount the OS root $_root"; return 1; }
	if [ -n "$QMR_BOOT" ]; then
		_boot=$(qmr_wait_device "$QMR_BOOT" 30) || { echo "QMR-RECOVERY error: no /boot $QMR_BOOT"; return 1; }
		mount -o rw "$_boot" /mnt/os/boot \
			|| { echo "QMR-RECOVERY error: cannot mount /boot $_boot"; return 1; }
	fi
	return 0
}

qmr_unmount_os()
{
	sync
	umount /mnt/os/boot 2>/dev/null
	umount /mnt/os 2>/dev/null
	if [ -n "${QMR_OS_VOLUME:-}" ]; then    # (the agent closes it; this is in case it could not)
		cryptsetup close qmr-os 2>/dev/null
		umount /mnt/boot 2>/dev/null
	fi
	sync
}

mountroot()
{
	. /etc/recovery/recovery-env.conf
	export PATH=/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin
	export HOME=/root PYTHONDONTWRITEBYTECODE=1
	mkdir -p /root /tmp /sys/fs/pstore
	for _m in $QMR_MODULES; do
		modprobe -q "$_m" 2>/dev/null || true
	done
	grep -q ' /sys/fs/pstore ' /proc/mounts || mount -t pstore pstore /sys/fs/pstore 2>/dev/null

	echo "QMR-RECOVERY-BEGIN"
	for _record in /sys/fs/pstore/*; do
		[ -f "$_record" ] || continue
		echo "QMR-PSTORE ${_record##*/}"
		cat "$_record"
		echo
	done

	_code=1
	if qmr_mount_os; then
		_count=$(sed -n 's/^boot_count=//p' /mnt/os/boot/grub/grubenv 2>/dev/null | head -n 1)
		echo "QMR-RECOVERY boot_count=${_count:-unset}"
		# Without a network the agent still runs: it detects, retries and gives up in time.
		IP=dhcp
		configure_networking
		echo "QMR-RECOVERY-AGENT start"
		recovery-agent --config /etc/recovery/agent.json run \
			${QMR_OS_VOLUME:+--os-volume "$QMR_OS_VOLUME" --boot-mount /mnt/boot}
		_code=$?
	else
		echo "QMR-RECOVERY boot_count=unknown"
	fi
	echo "QMR-AGENT exit=$_code"
	echo "QMR-RECOVERY-END"
	qmr_unmount_os
	if [ "$_code" -eq 12 ]; then
		echo "QMR-NEEDS-MANUAL"
		poweroff -f
	fi
	reboot -f
}
