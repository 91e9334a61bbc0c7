#!/bin/sh
# Quick Machine Recovery: what the recovery initramfs holds besides Debian's own pieces.
# Installed as hooks/qmr in the recovery environment's mkinitramfs configuration; mkinitramfs
# runs it with DESTDIR set. Adds: Python (Debian's interpreter and standard library, without
# what the agent never uses), the agent's virtual environment, its launcher, its settings.
set -e
case "${1:-}" in
	prereqs) echo ""; exit 0 ;;
esac
. /usr/share/initramfs-tools/hook-functions
. "${CONFDIR}/qmr.conf"    # QMR_PYTHON (python3.11), QMR_VENV, QMR_LAUNCHER, QMR_SETTINGS

# The interpreter and the libraries it links.
copy_exec "/usr/bin/${QMR_PYTHON}" /usr/bin
ln -sf "${QMR_PYTHON}" "${DESTDIR}/usr/bin/python3"

# Extension modules first, each with the libraries it links (copy_exec skips the libraries
# of a file that is already in the initramfs, so the trees are copied after).
for so in "/usr/lib/${QMR_PYTHON}/lib-dynload/"*.so $(find "${QMR_VENV}" -name '*.so'); do
	copy_exec "$so"
done

# The standard library, less what is never imported in the recovery environment.
mkdir -p "${DESTDIR}/usr/lib/${QMR_PYTHON}"
(cd "/usr/lib/${QMR_PYTHON}" && tar -cf - \
	--exclude=./test --exclude=./idlelib --exclude=./tkinter --exclude=./turtledemo \
	--exclude=./ensurepip --exclude=./lib2to3 --exclude=./pydoc_data --exclude=./distutils \
	--exclude=./unittest --exclude=./sqlite3 --exclude=./dbm --exclude=./curses \
	--exclude=./xmlrpc --exclude='./config-*' --exclude=./site-packages \
	--exclude=./dist-packages .) | (cd "${DESTDIR}/usr/lib/${QMR_PYTHON}" && tar -xf -)

# The agent's virtual environment and launcher.
mkdir -p "${DESTDIR}${QMR_VENV}"
(cd "${QMR_VENV}" && tar -cf - .) | (cd "${DESTDIR}${QMR_VENV}" && tar -xf -)
copy_file script "${QMR_LAUNCHER}"

# An encrypted OS root: the agent opens it with cryptsetup (the key on a pipe) and dm-crypt.
. "${CONFDIR}/recovery-env.conf"    # QMR_ROOT_LUKS
if [ -n "${QMR_ROOT_LUKS:-}" ]; then
	copy_exec /sbin/cryptsetup /sbin
	manual_add_modules dm_crypt xts
fi

# The settings the agent runs with in the recovery environment, and the machine's disks.
mkdir -p "${DESTDIR}/etc/recovery"
cp "${QMR_SETTINGS}" "${DESTDIR}/etc/recovery/agent.json"
cp "${CONFDIR}/recovery-env.conf" "${DESTDIR}/etc/recovery/recovery-env.conf"
# An empty busybox ash has no /etc/passwd: Python's getpass and home lookups want one.
[ -e "${DESTDIR}/etc/passwd" ] || echo "root:x:0:0:root:/root:/bin/sh" > "${DESTDIR}/etc/passwd"
exit 0
