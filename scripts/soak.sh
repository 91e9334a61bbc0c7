#!/usr/bin/env bash
# Soak the lab: run the whole recovery loop (recovery-lab run, QEMU) on every scenario in
# images/scenarios N times, one VM at a time, and print the pass rate per scenario.
#
# Usage: scripts/soak.sh N [SCENARIO...]      (default: every scenario)
#
# A run passes when it ends the way its scenario should end in the loop:
#   - a scenario whose [expect] ends_in is "healthy": the OS reports a healthy boot and the
#     server never hears of a crash;
#   - any other: the machine is recovered, or, when the catalog knows no fix for its crash
#     (the lab created no remediation), the device ends waiting for a person (needs_manual).
# Runs use --auto-approve and a short schedule (retry 4, time to reboot 12 lab minutes of one
# second, 2 attempts) so the scenarios without a fix end in minutes too.
# Reports go to .soak/<time>/<scenario>-<n>.json; the run folders of failed runs are kept
# there. Needs what `scripts/setup.sh --lab` installs; images are built (cached) first.
# Exit 0 when every run passed, 1 otherwise, 2 on bad usage.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: scripts/soak.sh N [SCENARIO...]   (N: runs per scenario, at least 1)" >&2
  exit 2
fi
runs=$1
shift
if [ $# -gt 0 ]; then
  scenarios=("$@")
else
  scenarios=()
  for f in images/scenarios/*.toml; do scenarios+=("$(basename "$f" .toml)"); done
fi
[ -x .venv/bin/recovery-lab ] || { echo "soak.sh: no .venv: run scripts/setup.sh --lab first" >&2; exit 2; }

out=.soak/$(date +%Y%m%d-%H%M%S)
mkdir -p "$out"
started=$(date +%s)
.venv/bin/recovery-lab build "${scenarios[@]}" > "$out/build.log"

for scenario in "${scenarios[@]}"; do
  for n in $(seq 1 "$runs"); do
    t0=$(date +%s)
    work="$out/$scenario-$n"
    extra=()
    # Only a fleet can name this one's culprit (recovery_lab/fleet.py).
    [ "$scenario" = silent-channel-file ] && extra=(--fleet 150)
    .venv/bin/recovery-lab run "$scenario" --auto-approve --retry-interval 4 --time-to-reboot 12 \
      --max-attempts 2 --timeout 1500 --workdir "$work" --report "$out/$scenario-$n.json" "${extra[@]}" \
      > "$out/$scenario-$n.log" 2>&1 || true
    verdict=$(.venv/bin/python - "$scenario" "$out/$scenario-$n.json" <<'EOF'
import json, sys, tomllib
from pathlib import Path

scenario, path = sys.argv[1], Path(sys.argv[2])
if not path.exists():
    print("FAIL (no report: the run did not finish, see its .log)")
    sys.exit()
report = json.loads(path.read_text())
expect = tomllib.loads(Path(f"images/scenarios/{scenario}.toml").read_text())["expect"]
kinds = [e["kind"] for e in report["server_events"]]
if expect["ends_in"] == "healthy":
    ok = "health.reported" in kinds and "diagnostics.received" not in kinds
    why = "healthy boot reported, no crash" if ok else "expected a healthy boot and no crash report"
elif report["recovered"]:
    ok, why = True, f"recovered in {report['time_to_recovery_s']}s"
elif "remediation.created" not in kinds:
    ok = report["device"].get("state") == "needs_manual"
    why = "no known fix: needs a person" if ok else "no known fix, yet the device does not need a person"
else:
    ok, why = False, "a fix was approved but the machine did not recover: " + "; ".join(report["problems"])
print(("PASS " if ok else "FAIL ") + why)
EOF
)
    echo "$scenario #$n: $verdict ($(( $(date +%s) - t0 ))s)"
    echo "$scenario $verdict" >> "$out/verdicts"
    case "$verdict" in PASS*) rm -rf "$work" ;; esac
  done
done

echo
echo "pass rate per scenario ($runs run(s) each), $(( $(date +%s) - started ))s in all:"
failed=0
for scenario in "${scenarios[@]}"; do
  passed=$(grep -c "^$scenario PASS" "$out/verdicts" || true)
  [ "$passed" -eq "$runs" ] || failed=1
  printf '  %-14s %d/%d (%d%%)\n' "$scenario" "$passed" "$runs" $(( 100 * passed / runs ))
done
echo "reports in $out"
exit $failed
