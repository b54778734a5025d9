#!/bin/bash
# Issue 14 measurements on the demo model (SmolLM2-135M, its "fp" is dequantized Q4_1), 2 CPU cores:
#  A. the demo sweep, then the same command again (finished jobs are skipped);
#  B. the demo sweep killed with -9 while job 1 runs, then the same command (only job 1 is redone);
#  C. a sweep with a bad job (group size 7 divides no layer): the others run, one summary, exit 1.
#   scripts/sweep_resilience.sh [WORK_DIR]     (about 10 min)
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${1:-results/sweep_resilience}
mkdir -p "$WORK"
timed() { local s; s=$(date +%s.%N); "$@" > /dev/null 2>> "$WORK/log.txt"; local rc=$?
  echo "rc=$rc wall=$(echo "$(date +%s.%N) - $s" | bc) s: ${*: -3}"; }

echo "== A: demo, then the same command again"
export QUANTLAB_RESULTS=$WORK/a
timed $PY -m quantlab
timed $PY -m quantlab
grep -c "skipped: variant" "$WORK/log.txt"

echo "== B: demo killed -9 during job 1, then the same command"
export QUANTLAB_RESULTS=$WORK/b
s=$(date +%s.%N)
setsid $PY -m quantlab > /dev/null 2>&1 &
pid=$!
until ls "$QUANTLAB_RESULTS"/sweeps/demo/*/1/variant.json > /dev/null 2>&1; do sleep 0.2; done
sleep 5
kill -9 -- -"$pid"; wait "$pid" 2> /dev/null
echo "killed after $(echo "$(date +%s.%N) - $s" | bc) s"
timed $PY -m quantlab
$PY -m quantlab.report "$QUANTLAB_RESULTS" --metrics ppl

echo "== C: a bad job in a sweep"
export QUANTLAB_RESULTS=$WORK/c
timed $PY -m quantlab -m quantizer=rtn quantizer.format.group_size=64,7,32
grep -A2 "job(s) of the sweep" "$WORK/log.txt" | tail -3
