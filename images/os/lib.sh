# Shell functions shared by the OS's initramfs /init, the OS /sbin/init and the recovery
# environment's /init (busybox sh). Sourced, never run.

# Mount the kernel's virtual filesystems (once: after switch_root they are already there).
qmr_mount_kernel_fs() {
    # (busybox-static has no mountpoint applet: ask /proc/mounts)
    [ -e /proc/mounts ] || mount -t proc proc /proc
    grep -q '^sysfs /sys ' /proc/mounts || mount -t sysfs sysfs /sys
    grep -q '^devtmpfs /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
}

# The options a modprobe would take from the kernel command line for module $1:
# every word "<module>.<param>=<value>" (busybox insmod does not read /proc/cmdline).
qmr_module_args() {
    _m=$(echo "$1" | tr - _)
    for _w in $(cat /proc/cmdline); do
        case "$_w" in
            "$_m".*) printf '%s ' "${_w#"$_m".}" ;;
        esac
    done
}

# Load the modules listed (one path relative to /lib/modules/<kver> a line, dependencies
# first) in file $1, skipping those already loaded.
qmr_load_modules() {
    _dir=/lib/modules/$(uname -r)
    while read -r _path; do
        [ -n "$_path" ] || continue
        _name=$(basename "$_path" .ko | tr - _)
        [ -d "/sys/module/$_name" ] && continue
        # shellcheck disable=SC2046
        insmod "$_dir/$_path" $(qmr_module_args "$_name") || echo "qmr: insmod $_path failed"
    done < "$1"
}

# Wait up to $2 seconds for block device $1 to appear.
qmr_wait_for() {
    _i=0
    while [ ! -b "$1" ] && [ "$_i" -lt "$(( $2 * 10 ))" ]; do
        sleep 0.1
        _i=$((_i + 1))
    done
    [ -b "$1" ]
}

# The value of variable $2 in the GRUB environment block $1 ("" if unset).
qmr_grubenv_get() {
    sed -n "s/^$2=//p" "$1" | head -n 1
}

# Set boot_count=0 in the GRUB environment block $1, in place: same file, same 1024 bytes
# (GRUB's save_env writes the file's sectors directly, so it must never move or change size).
qmr_grubenv_reset() {
    _env=$1
    [ "$(wc -c < "$_env")" -eq 1024 ] || { echo "qmr: $_env is not 1024 bytes"; return 1; }
    head -n 1 "$_env" | grep -q '^# GRUB Environment Block$' || { echo "qmr: $_env is no GRUB env block"; return 1; }
    _vars=$(sed -n '/^[A-Za-z0-9_]*=/p' "$_env" | sed 's/^boot_count=.*/boot_count=0/')
    case "$_vars" in *boot_count=*) ;; *) _vars="$_vars
boot_count=0" ;; esac
    { printf '# GRUB Environment Block\n%s\n' "$_vars"; printf '%1024s' '' | tr ' ' '#'; } \
        | head -c 1024 > /tmp/grubenv.new
    dd if=/tmp/grubenv.new of="$_env" bs=1024 count=1 conv=notrunc,fsync 2>/dev/null || return 1
    sync
}

# Mount the lab's seed disk ($1, default /dev/vdb: a small FAT image made per run by the
# host, holding agent.json and device.key) read-only at /seed. Succeeds only if it holds
# agent.json; without a seed disk the machine behaves as it always did.
qmr_seed_mount() {
    _dev=${1:-/dev/vdb}
    [ -b "$_dev" ] || return 1
    mkdir -p /seed
    grep -q ' /seed ' /proc/mounts || mount -t vfat -o ro "$_dev" /seed 2>/dev/null || return 1
    [ -f /seed/agent.json ] && return 0
    umount /seed 2>/dev/null
    return 1
}

# Bring up lo and eth0 with a DHCP lease (QEMU user networking answers it); the udhcpc
# script /usr/share/udhcpc/default.script sets the address, the route and resolv.conf.
qmr_net_up() {
    ip link set lo up
    ip link set eth0 up || { echo "qmr: no eth0"; return 1; }
    udhcpc -i eth0 -s /usr/share/udhcpc/default.script -n -q -t 10 >/dev/null 2>&1 \
        || { echo "qmr: no DHCP lease on eth0"; return 1; }
    echo "qmr: eth0 $(ip -4 addr show dev eth0 | sed -n 's/.*inet \([0-9./]*\).*/\1/p')"
}

# The OS's boot progress, on its own disk: "start STEP" before a step that can stop the boot,
# "done STEP" after it, "boot complete" once the health check passed. Synced at each line,
# so after a hang and a watchdog reset the recovery agent reads where the boot stopped.
QMR_PROGRESS=/var/log/boot-progress.log
qmr_progress() {
    echo "$(cut -d' ' -f1 /proc/uptime) $*" >> "$QMR_PROGRESS"
    sync
}

qmr_progress_new_boot() {
    # Keep the last few boots only.
    if [ -f "$QMR_PROGRESS" ]; then
        tail -n 200 "$QMR_PROGRESS" > "$QMR_PROGRESS.new" && mv "$QMR_PROGRESS.new" "$QMR_PROGRESS"
    fi
    qmr_progress "boot start"
}

# A module a remediation disabled (disable_driver writes a modprobe.d blacklist entry).
qmr_module_disabled() {
    cat /etc/modprobe.d/*.conf 2>/dev/null | grep -qx "blacklist $1"
}
