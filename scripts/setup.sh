#!/usr/bin/env bash
# Set up everything the project needs on a Debian 12 machine, idempotently:
#   Debian packages (apt-get, only the missing ones), then a venv in .venv with the project
#   and its Python dependencies (reinstalled only when pyproject.toml changed).
# Usage: scripts/setup.sh [--test] [--lab] [--postgres]
#   --test      also the test dependencies (and Chromium, for the dashboard tests)
#   --lab       also what the QEMU lab needs (QEMU, GRUB, mkfs, mtools, busybox, kernel build tools)
#   --postgres  also a PostgreSQL server (Debian's), for the store tests on PostgreSQL
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0 want_lab=0 want_pg=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    --lab) want_lab=1 ;;
    --postgres) want_pg=1 ;;
    *) echo "setup.sh: unknown option $arg (use --test, --lab, --postgres)" >&2; exit 2 ;;
  esac
done

packages=(python3 python3-venv python3-pip ca-certificates)
if [ "$want_test" = 1 ]; then
  packages+=(chromium chromium-driver)   # the dashboard is tested in a real browser
  packages+=(cryptsetup-bin)             # an escrowed disk key opens a real LUKS2 keyslot
fi
if [ "$want_lab" = 1 ]; then
  packages+=(qemu-system-x86 qemu-utils grub-pc-bin grub-common dosfstools mtools e2fsprogs
             fdisk busybox-static cpio gzip kmod make gcc-12 libc6-dev
             mmdebstrap ovmf   # the stock-Debian base: its tree, and UEFI machines
             cryptsetup-bin)   # its encrypted variant: the LUKS2 header of the root
fi
if [ "$want_pg" = 1 ]; then
  packages+=(postgresql)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> installing Debian packages: ${missing[*]}"
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "setup.sh: need root or sudo to install ${missing[*]}" >&2; exit 1; }
    sudo=sudo
  fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -q
  $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The lab downloads Debian's kernel and python3.11 packages with apt-get download: it needs
# package lists even when everything above was already installed.
if [ "$want_lab" = 1 ] && ! apt-cache show linux-image-amd64 python3.11-minimal >/dev/null 2>&1; then
  echo "==> apt-get update (the lab downloads Debian's kernel and Python packages)"
  if [ "$(id -u)" = 0 ]; then apt-get update -q; else sudo apt-get update -q; fi
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup.sh: $PY is $("$PY" --version 2>&1); Python 3.11 or newer is needed" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi

extras="" stamp=".venv/.installed"
if [ "$want_test" = 1 ]; then
  extras="[test]" stamp=".venv/.installed-test"
fi
want_hash="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want_hash" ]; then
  echo "==> installing the project into .venv${extras:+ with test tools}"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e ".${extras}"
  echo "$want_hash" > "$stamp"
fi
