#!/bin/bash
# One device call of a GPU MQAR sweep that spans calls and sessions. results/mqar/EXPERIMENT/results.jsonl
# (committed) is the resume point: it is copied in, the sweep skips the runs it holds, and the grown file
# comes back in $OUT with summary.md, accuracy.png and the log, to be committed again.
#
#   KILL_S=300 bash benchmarks/mqar_sweep_gpu.sh paper-fig1 --models rebased,based --lengths 128 --workers 6 --time-limit 3.5
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
name=$1
shift
work=/tmp/mqar-$name
mkdir -p "$work"
cp "results/mqar/$name/results.jsonl" "$work/" 2>/dev/null
start=$(date +%s)
timeout "${KILL_S:-480}" python3 -m rebased mqar "$name" "$@" --out "$work" 2>&1 | grep -v Warning | tee -a "$OUT/$name.log"
echo "wall seconds of this call's sweep: $(($(date +%s) - start)) ($*)" | tee -a "$OUT/$name.log"
cp "$work/results.jsonl" "$work/summary.md" "$work/accuracy.png" "$OUT/" 2>/dev/null
exit 0
