#!/usr/bin/env bash
# The README's second command, and what CI runs (.ci/run): set up, then every test, in three
# steps (docs/testing.md):
#   1. every test but the QEMU ones;
#   2. the lab's disk images and the QEMU harness's guest, built once (cached under .cache/qmr or
#      $QMR_CACHE), so that two QEMU workers never build the same thing at the same time;
#   3. the QEMU tests, two VMs at a time (one per core; QMR_QEMU_WORKERS overrides), each worker
#      fed one test at a time, longest first. Tests marked `slow` run only with --slow.
# Usage: scripts/test.sh [--slow]
#        scripts/test.sh PYTEST_ARGS...   one pytest run with these arguments instead, e.g.
#                                         scripts/test.sh -m "not qemu" -x
set -euo pipefail
cd "$(dirname "$0")/.."
slow=0
if [ "${1:-}" = "--slow" ]; then
  slow=1
  shift
fi
scripts/setup.sh --test --lab --postgres
# Lint, format and types first: cheap, and a failure names the file and the line.
echo "==> ruff check, ruff format --check, mypy"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# The store tests run on SQLite and on a real PostgreSQL started here (loopback only).
QMR_TEST_POSTGRES=$(scripts/postgres.sh start)
export QMR_TEST_POSTGRES
trap 'scripts/postgres.sh stop' EXIT

if [ $# -gt 0 ]; then
  .venv/bin/python -m pytest -ra "$@"
  exit
fi

status=0
.venv/bin/python -m pytest -ra -m "not qemu" || status=$?

SECONDS=0
# The QEMU part writes the images (about 2.5 GiB under the cache) and, per running VM, its
# overlay and logs (a few hundred MB, removed when its test passes). Say so before it starts
# when the disk is short, rather than fail in the middle with "No space left on device".
need_mib=3072
for dir in "${QMR_CACHE:-.cache/qmr}" "${TMPDIR:-/tmp}"; do
  mkdir -p "$dir"
  free_mib=$(( $(df -Pk "$dir" | awk 'NR == 2 {print $4}') / 1024 ))
  echo "==> $free_mib MiB free on the disk of $dir"
  if [ "$free_mib" -lt "$need_mib" ]; then
    echo "warning: the QEMU tests need about $need_mib MiB free there; free some space, or point" \
         "QMR_CACHE (the images) or TMPDIR (the tests' folders) at a larger disk" >&2
  fi
done
.venv/bin/recovery-lab build
.venv/bin/python -c 'from tests.qemu_guest import build_harness_guest; build_harness_guest()'
workers=${QMR_QEMU_WORKERS:-$(( $(nproc) < 2 ? 1 : 2 ))}
marks="qemu and not slow"
if [ "$slow" = 1 ]; then
  marks="qemu"
  export QMR_SLOW=1  # tests/conftest.py skips slow tests unless asked
fi
.venv/bin/python -m pytest -ra -m "$marks" -n "$workers" --dist load --maxschedchunk 1 || status=$?
echo "QEMU part (image build and $workers worker(s)): ${SECONDS}s"
exit "$status"
