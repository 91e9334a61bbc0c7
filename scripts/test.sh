#!/usr/bin/env bash
# The README's second command: set up, then run every test (QEMU tests included: they build
# the lab's disk images first, cached under .cache/qmr or $QMR_CACHE).
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not qemu" -x
set -euo pipefail
cd "$(dirname "$0")/.."
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
.venv/bin/python -m pytest -ra "$@"
