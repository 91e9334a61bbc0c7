#!/usr/bin/env bash
# The README's second command: set up, then run every test (QEMU tests included).
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not qemu" -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
exec .venv/bin/python -m pytest -ra "$@"
