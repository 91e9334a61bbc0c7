#!/bin/sh
# Regenerate the real panic logs in tests/data/panic/ (see README.md there and
# images/sensor/NOTES.md).  Run from the repository root on Debian 12 as root:
#
#   apt-get update
#   apt-get install -y qemu-system-x86 busybox-static cpio gcc-12 make kmod python3
#   sh tests/data/panic/src/capture.sh            # writes into $WORK, then tests/data/panic/
#
# KVER pins the kernel ABI; the default is what linux-image-amd64 depended on when
# the logs were made.  Set KVER=auto to use the current dependency.
set -eu

REPO=$(pwd)
WORK=${WORK:-/tmp/qmr-capture}
KVER=${KVER:-6.1.0-56-amd64}
OUT=${OUT:-$REPO/tests/data/panic}
QEMU="qemu-system-x86_64 -accel tcg -m 512 -nographic"

if [ "$KVER" = auto ]; then
    KVER=$(apt-cache depends linux-image-amd64 | sed -n 's/.*Depends: linux-image-\(.*\)$/\1/p' | head -1)
fi
ABI=${KVER%-amd64}                      # 6.1.0-56
echo "kernel $KVER"

mkdir -p "$WORK/deb" "$WORK/kroot"
cd "$WORK/deb"
# apt-get download runs as _apt and warns about the unreadable cwd when root; harmless.
apt-get download "linux-image-$KVER" "linux-headers-$KVER" "linux-headers-$ABI-common" linux-kbuild-6.1
for f in ./*.deb; do dpkg-deb -x "$f" "$WORK/kroot"; done
KROOT=$WORK/kroot
HDR=$KROOT/usr/src/linux-headers-$KVER
# Pitfall: Debian's per-flavour headers Makefile is the single line
#   include /usr/src/linux-headers-<abi>-common/Makefile
# (absolute).  Point it at the unpacked copy; everything else in the tree
# (scripts -> ../../lib/linux-kbuild-6.1/scripts) is relative and works.
sed -i "s#^include /usr/src/\(linux-headers-[^/]*-common\)/Makefile#include \$(CURDIR)/../\1/Makefile#" "$HDR/Makefile"
# modules.dep is not shipped in the .deb (depmod runs at install time).
depmod -b "$KROOT" "$KVER"

# Build the modules out of the source tree (keeps the repo clean).
rm -rf "$WORK/sensor" "$WORK/nullderef"
mkdir -p "$WORK/sensor" "$WORK/nullderef"
cp "$REPO/images/sensor/sensor.c" "$REPO/images/sensor/Makefile" "$WORK/sensor/"
make -C "$WORK/sensor" KDIR="$HDR"
cp "$REPO/tests/data/panic/src/nullderef.c" "$WORK/nullderef/"
echo 'obj-m := nullderef.o' > "$WORK/nullderef/Kbuild"
make -C "$HDR" M="$WORK/nullderef" modules

# initramfs: busybox, /init, modules, channel files.
R=$WORK/root
rm -rf "$R"
mkdir -p "$R/bin" "$R/proc" "$R/sys" "$R/dev" "$R/tmp" "$R/lib/modules" "$R/var/lib/sensor/channels"
cp /bin/busybox "$R/bin/busybox"
ln -s busybox "$R/bin/sh"              # pitfall: /init's #!/bin/sh must exist before --install
cp "$REPO/tests/data/panic/src/init.sh" "$R/init"
chmod 755 "$R/init"
M=$KROOT/lib/modules/$KVER/kernel
cp "$WORK/sensor/sensor.ko" "$WORK/nullderef/nullderef.ko" \
   "$M/lib/reed_solomon/reed_solomon.ko" "$M/fs/pstore/ramoops.ko" "$R/lib/modules/"
CH=$R/var/lib/sensor/channels
python3 "$REPO/images/sensor/mkchannel.py" "$CH/C-00000291-00000000-00000031.sys" --template-fields 20 --content-fields 20
python3 "$REPO/images/sensor/mkchannel.py" "$CH/C-00000291-00000000-00000032.sys" --template-fields 21 --content-fields 20
(cd "$R" && find . | sort | cpio -o -H newc --quiet -R 0:0 | gzip -9 > "$WORK/initrd.gz")
cp "$KROOT/boot/vmlinuz-$KVER" "$WORK/vmlinuz"

cd "$WORK"
K="-kernel vmlinuz -initrd initrd.gz"
RAMOOPS='memmap=1M$0x7f00000 ramoops.mem_address=0x7f00000 ramoops.mem_size=0x100000 ramoops.record_size=0x20000'

# 1. channel file crash, serial console (panic=5 then QEMU exits: -no-reboot)
timeout 120 $QEMU -no-reboot $K -append "console=ttyS0 oops=panic panic=5" > channel-file.log 2>&1 || true
# 2. same crash with ramoops; panic=5 reboots the VM (no -no-reboot), the second
#    boot finds the pstore records, prints them and powers off.
timeout 120 $QEMU $K -append "console=ttyS0 oops=panic panic=5 $RAMOOPS" > pstore.log 2>&1 || true
# 3. NULL dereference in another module; no panic= so the kernel stays halted
#    and prints the "---[ end Kernel panic" line; timeout ends QEMU (rc 124).
timeout 30 $QEMU -no-reboot $K -append "console=ttyS0 oops=panic qmr.test=null" > null.log 2>&1 || true
# 4. init exits: "Attempted to kill init!"
timeout 60 $QEMU -no-reboot $K -append "console=ttyS0 oops=panic panic=5 qmr.test=initexit" > initexit.log 2>&1 || true
# 5. sensor hang=1: soft lockup reports, no panic; timeout ends QEMU.
timeout 75 $QEMU -no-reboot $K -append "console=ttyS0 oops=panic panic=5 qmr.test=hang" > hang.log 2>&1 || true

T="python3 $REPO/tests/data/panic/src/trim.py"
$T console channel-file.log "$OUT/channel-file-console.txt"
$T pstore:Panic pstore.log "$OUT/channel-file-pstore.txt"
$T pstore:Oops pstore.log "$OUT/channel-file-pstore-oops.txt"
$T console null.log "$OUT/null-deref-console.txt"
$T console initexit.log "$OUT/init-exit-console.txt"
$T console hang.log "$OUT/sensor-hang-console.txt"
echo "logs written to $OUT"
