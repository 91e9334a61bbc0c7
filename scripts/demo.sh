#!/usr/bin/env bash
# The README's first command: set up, then run the recovery demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/recovery-lab demo "$@"
