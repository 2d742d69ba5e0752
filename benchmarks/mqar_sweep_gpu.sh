#!/bin/bash
# One device call of an MQAR sweep that outlasts a call: resume from the committed results and the runs left in
# flight by the last call, train for MINUTES, then send back the grown results.jsonl and the runs in flight now.
#
#   EXPERIMENT=paper-fig1 MINUTES=9 ARGS="--models rebased,based --lengths 512,1024,2048 --d-models 64,128" \
#       bash benchmarks/mqar_sweep_gpu.sh          # carry .sweep (git-ignored); at most MINUTES + 40 seconds
#
# MINUTES=9 fills a 10-minute device call: at the limit the sweep checkpoints its run in flight and ends within
# seconds (7 s in the calls so far), and the packing takes a few more. DEADLINE (a `date +%s` time, optional)
# shortens MINUTES so that the sweep stops training 40 s before it: two experiments can share a call, the second
# taking what the first leaves when its runs are all done:
#
#   end=$(( $(date +%s) + 570 ))
#   DEADLINE=$end EXPERIMENT=paper-fig1 MINUTES=9 ARGS="..." bash benchmarks/mqar_sweep_gpu.sh
#   DEADLINE=$end EXPERIMENT=paper-ablation MINUTES=9 ARGS="--seeds 1" bash benchmarks/mqar_sweep_gpu.sh
#
# In: results/mqar/EXPERIMENT/results.jsonl (committed: the finished runs) and .sweep/EXPERIMENT/runs/ (each run
# still training: its checkpoint, config and metrics). Out, under $OUT/EXPERIMENT: results.jsonl (commit it over
# the one in results/), sweep.log, and inflight.tgz.* (the runs in flight at the limit, in 15 MB parts); and
# $OUT/triton_cache.tgz. Unpack them for the next call, in this session or a later one, with
# benchmarks/mqar_sweep_unpack.sh OUT_DIR (which also takes triton_cache.tgz into .triton_cache, for the next
# call to carry beside .sweep, and remakes the summary).
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
# Triton's compiled kernels in the repository (git-ignored), so a later call skips compiling them: on the same
# warm machine as it is, and on a fresh one when .triton_cache is carried (unpack $OUT/triton_cache.tgz first)
export TRITON_CACHE_DIR=$PWD/.triton_cache
experiment=${EXPERIMENT:-paper-fig1}
minutes=${MINUTES:-9}
if [ -n "${DEADLINE:-}" ]; then
    minutes=$(awk -v m="$minutes" -v left="$(( DEADLINE - $(date +%s) - 40 ))" 'BEGIN {print (left / 60 < m) ? left / 60 : m}')
fi
if awk -v m="$minutes" 'BEGIN {exit !(m < 0.5)}'; then
    echo "$experiment: $minutes minutes left before DEADLINE, under the half minute a start takes: not run"
    exit 0
fi
out=$OUT/$experiment
mkdir -p "$out"
work=/tmp/sweep
mkdir -p "$work/$experiment/runs"
cp "results/mqar/$experiment/results.jsonl" "$work/$experiment/" 2>/dev/null
if [ -d ".sweep/$experiment/runs" ]; then
    cp -r ".sweep/$experiment/runs/." "$work/$experiment/runs/"
fi
# shellcheck disable=SC2086  # ARGS is a list of options
timeout "$(awk "BEGIN {print int($minutes * 60 + 40)}")" python3 -c \
    "import sys; from rebased.cli import main; sys.exit(main(sys.argv[1:]))" \
    mqar "$experiment" ${ARGS} --out "$work/$experiment" --time-limit "$minutes" 2>&1 \
    | tee "$out/sweep.log" | grep -v "it/s\]$"
cp "$work/$experiment/results.jsonl" "$out/"
# a run in flight has a checkpoint and no saved model (a finished run saves model.safetensors)
(
    cd "$work" || exit 1
    for run in "$experiment"/runs/*/; do
        [ -f "$run/checkpoint.pt" ] && [ ! -f "$run/model.safetensors" ] && echo "$run"
    done
) | tar czf - -C "$work" -T - | split -b 15m - "$out/inflight.tgz."
[ -d .triton_cache ] && tar czf "$OUT/triton_cache.tgz" .triton_cache
ls -l "$OUT" "$out"
