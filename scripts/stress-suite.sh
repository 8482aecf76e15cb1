#!/bin/bash
# Issue 21's proof that the suite holds under load: `make test` twice while two busy loops keep both
# cores loaded. Logs: $OUT/stress-1.log, stress-2.log, stress-summary.log, stress-load.log (uptime each minute).
# Usage: bash scripts/stress-suite.sh [OUT_DIR]   (run from the repository root)
set -u
OUT=${1:-/tmp/clipsearch-stress}
mkdir -p "$OUT"
( while :; do :; done ) & L1=$!
( while :; do :; done ) & L2=$!
( while :; do uptime >> "$OUT/stress-load.log"; sleep 60; done ) & U=$!
trap 'kill $L1 $L2 $U 2>/dev/null' EXIT
for i in 1 2; do
  start=$(date +%s)
  make test > "$OUT/stress-$i.log" 2>&1
  echo "run $i rc=$? seconds=$(( $(date +%s) - start ))" >> "$OUT/stress-summary.log"
done
cat "$OUT/stress-summary.log"
