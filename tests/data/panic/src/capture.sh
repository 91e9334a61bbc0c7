#!/bin/sh
# Regenerate the real panic logs in tests/data/panic/ (see README.md there and
# images/sensor/NOTES.md).  Run from the repository root on Debian 12 as root:
#
#   apt-get update
#   apt-get install -y qemu-system-x86 busybox-static cpio gcc-12 make kmod python3
#   sh tests/data/panic/src/capture.sh            # writes into $WORK, then tests/data/panic/
#
# KVER pins the kernel ABI; the default is what linux-image-amd64 depended on when
# the logs were made.  Set KVER=auto to use the current dependency.  ONLY (a space-
# separated list of the capture names below, e.g. ONLY="warn bug") boots only those.
set -eu

REPO=$(pwd)
WORK=${WORK:-/tmp/qmr-capture}
KVER=${KVER:-6.1.0-56-amd64}
OUT=${OUT:-$REPO/tests/data/panic}
ONLY=${ONLY:-}
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
rm -rf "$WORK/sensor" "$WORK/nullderef" "$WORK/crashkinds"
mkdir -p "$WORK/sensor" "$WORK/nullderef" "$WORK/crashkinds"
cp "$REPO/images/sensor/sensor.c" "$REPO/images/sensor/Makefile" "$WORK/sensor/"
make -C "$WORK/sensor" KDIR="$HDR"
cp "$REPO/tests/data/panic/src/nullderef.c" "$WORK/nullderef/"
echo 'obj-m := nullderef.o' > "$WORK/nullderef/Kbuild"
make -C "$HDR" M="$WORK/nullderef" modules
cp "$REPO/tests/data/panic/src/crashkinds.c" "$WORK/crashkinds/"
# __FILE__ (in the WARNING and BUG lines) relative to the module's directory, as in-tree.
printf 'obj-m := crashkinds.o\nccflags-y := -fmacro-prefix-map=$(src)/=\n' > "$WORK/crashkinds/Kbuild"
make -C "$HDR" M="$WORK/crashkinds" modules

# initramfs: busybox, /init, modules, channel files.
R=$WORK/root
rm -rf "$R"
mkdir -p "$R/bin" "$R/proc" "$R/sys" "$R/dev" "$R/tmp" "$R/lib/modules" "$R/var/lib/sensor/channels"
cp /bin/busybox "$R/bin/busybox"
ln -s busybox "$R/bin/sh"              # pitfall: /init's #!/bin/sh must exist before --install
cp "$REPO/tests/data/panic/src/init.sh" "$R/init"
chmod 755 "$R/init"
M=$KROOT/lib/modules/$KVER/kernel
cp "$WORK/sensor/sensor.ko" "$WORK/nullderef/nullderef.ko" "$WORK/crashkinds/crashkinds.ko" \
   "$M/lib/reed_solomon/reed_solomon.ko" "$M/fs/pstore/ramoops.ko" "$R/lib/modules/"
CH=$R/var/lib/sensor/channels
python3 "$REPO/images/sensor/mkchannel.py" "$CH/C-00000291-00000000-00000031.sys" --template-fields 20 --content-fields 20
python3 "$REPO/images/sensor/mkchannel.py" "$CH/C-00000291-00000000-00000032.sys" --template-fields 21 --content-fields 20
(cd "$R" && find . | sort | cpio -o -H newc --quiet -R 0:0 | gzip -9 > "$WORK/initrd.gz")
cp "$KROOT/boot/vmlinuz-$KVER" "$WORK/vmlinuz"

cd "$WORK"
K="-kernel vmlinuz -initrd initrd.gz"
RAMOOPS='memmap=1M$0x7f00000 ramoops.mem_address=0x7f00000 ramoops.mem_size=0x100000 ramoops.record_size=0x20000'

# want NAME: boot this capture (every capture unless ONLY names some).
want() { [ -z "$ONLY" ] || case " $ONLY " in *" $1 "*) true ;; *) false ;; esac; }
T="python3 $REPO/tests/data/panic/src/trim.py"

# 1. channel file crash, serial console (panic=5 then QEMU exits: -no-reboot)
if want channel-file; then
    timeout 120 $QEMU -no-reboot $K -append "console=ttyS0 oops=panic panic=5" > channel-file.log 2>&1 || true
    $T console channel-file.log "$OUT/channel-file-console.txt"
fi
# 2. same crash with ramoops; panic=5 reboots the VM (no -no-reboot), the second
#    boot finds the pstore records, prints them and powers off.
if want pstore; then
    timeout 120 $QEMU $K -append "console=ttyS0 oops=panic panic=5 $RAMOOPS" > pstore.log 2>&1 || true
    $T pstore:Panic pstore.log "$OUT/channel-file-pstore.txt"
    $T pstore:Oops pstore.log "$OUT/channel-file-pstore-oops.txt"
fi
# 3. NULL dereference in another module; no panic= so the kernel stays halted
#    and prints the "---[ end Kernel panic" line; timeout ends QEMU (rc 124).
if want null; then
    timeout 30 $QEMU -no-reboot $K -append "console=ttyS0 oops=panic qmr.test=null" > null.log 2>&1 || true
    $T console null.log "$OUT/null-deref-console.txt"
fi
# 4. init exits: "Attempted to kill init!"
if want initexit; then
    timeout 60 $QEMU -no-reboot $K -append "console=ttyS0 oops=panic panic=5 qmr.test=initexit" > initexit.log 2>&1 || true
    $T console initexit.log "$OUT/init-exit-console.txt"
fi
# 5. sensor hang=1: soft lockup reports, no panic; timeout ends QEMU.
if want hang; then
    timeout 75 $QEMU -no-reboot $K -append "console=ttyS0 oops=panic panic=5 qmr.test=hang" > hang.log 2>&1 || true
    $T console hang.log "$OUT/sensor-hang-console.txt"
fi
# 6. sensor strict=1: the driver itself calls panic() on the bad channel file.
if want panic; then
    timeout 60 $QEMU -no-reboot $K -append "console=ttyS0 oops=panic panic=5 qmr.test=panic" > panic.log 2>&1 || true
    $T console panic.log "$OUT/sensor-panic-console.txt"
fi
# 7. crashkinds kind=warn: a WARNING, no panic; init powers off after insmod.
if want warn; then
    timeout 60 $QEMU -no-reboot $K -append "console=ttyS0 oops=panic panic=5 qmr.test=warn" > warn.log 2>&1 || true
    $T console warn.log "$OUT/warning-console.txt"
fi
# 8. crashkinds kind=bug: "kernel BUG at", an oops, the panic.
if want bug; then
    timeout 60 $QEMU -no-reboot $K -append "console=ttyS0 oops=panic panic=5 qmr.test=bug" > bug.log 2>&1 || true
    $T console bug.log "$OUT/kernel-bug-console.txt"
fi
# 9. crashkinds kind=divide: "divide error", an oops, the panic.
if want divide; then
    timeout 60 $QEMU -no-reboot $K -append "console=ttyS0 oops=panic panic=5 qmr.test=divide" > divide.log 2>&1 || true
    $T console divide.log "$OUT/divide-error-console.txt"
fi
# 10. crashkinds kind=hung: insmod blocks in state D; /init lowers the hung task
#     timeout to 5 s; no panic; timeout ends QEMU.
if want hung; then
    timeout 50 $QEMU -no-reboot $K -append "console=ttyS0 oops=panic panic=5 qmr.test=hung" > hung.log 2>&1 || true
    $T console hung.log "$OUT/hung-task-console.txt"
fi
echo "logs written to $OUT"
