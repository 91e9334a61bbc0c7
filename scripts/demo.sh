#!/usr/bin/env bash
# The README's first command: set up (Debian packages, .venv), build the lab's disk images
# (cached under .cache/qmr, or $QMR_CACHE), and run the CrowdStrike case end to end in QEMU:
# a sensor driver crashing on channel file 291 at every boot, GRUB switching to the recovery
# environment, the agent reporting to a recovery server on this machine, a fix written and
# approved by two lab people (--auto-approve), the reboot and the healthy boot reported back.
# Extra arguments go to `recovery-lab run`, e.g. scripts/demo.sh bad-driver, or drop the
# approval to a person: scripts/demo.sh channel-file --no-auto-approve
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --lab
scenario=channel-file
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then scenario=$1; shift; fi
auto=--auto-approve
args=()
for a in "$@"; do
  if [ "$a" = --no-auto-approve ]; then auto=""; else args+=("$a"); fi
done
mkdir -p .cache/qmr/runs
exec .venv/bin/recovery-lab run "$scenario" $auto --report ".cache/qmr/runs/$scenario.json" "${args[@]}"
