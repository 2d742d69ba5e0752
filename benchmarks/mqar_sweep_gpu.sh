#!/bin/bash
# One device call of a GPU MQAR sweep that spans calls and sessions. results/mqar/EXPERIMENT/results.jsonl
# (committed) is the resume point: it is copied in, the sweep skips the runs it holds, and the grown file
# comes back in $OUT with summary.md, accuracy.png and the log, to be committed again.
#
# Runs still training at --time-limit checkpoint and stop. Their run folders come back as
# $OUT/inflight.tar.part-* (15 MB pieces; a d_model 64 run is about 7 MB). To resume them in the next call,
# put the pieces in .sweep/EXPERIMENT/ (git-ignored) and carry it:
#     rm -rf .sweep/paper-fig1 && mkdir -p .sweep/paper-fig1 && cp /work/.device/N/inflight.tar.part-* .sweep/paper-fig1/
#     run(command="KILL_S=540 bash benchmarks/mqar_sweep_gpu.sh paper-fig1 ...", carry=[".sweep"])
#
#   KILL_S=540 bash benchmarks/mqar_sweep_gpu.sh paper-fig1 --models rebased,based --workers 1 --time-limit 8
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
name=$1
shift
work=/tmp/mqar-$name
mkdir -p "$work"
cp "results/mqar/$name/results.jsonl" "$work/" 2>/dev/null
if ls ".sweep/$name"/inflight.tar.part-* >/dev/null 2>&1; then
    cat ".sweep/$name"/inflight.tar.part-* | tar -xf - -C "$work" && echo "resuming: $(ls "$work/runs")"
fi
start=$(date +%s)
timeout "${KILL_S:-480}" python3 -m rebased mqar "$name" "$@" --out "$work" 2>&1 | grep -v Warning | tee -a "$OUT/$name.log"
echo "wall seconds of this call's sweep: $(($(date +%s) - start)) ($*)" | tee -a "$OUT/$name.log"
cp "$work/results.jsonl" "$work/summary.md" "$work/accuracy.png" "$OUT/" 2>/dev/null
# Run folders with a checkpoint but no line in results.jsonl: stopped by the time limit, to resume next call.
inflight=()
for dir in "$work"/runs/*/; do
    id=$(basename "$dir")
    [ -f "$dir/checkpoint.pt" ] && ! grep -q "\"run_id\": \"$id\"" "$work/results.jsonl" 2>/dev/null && inflight+=("runs/$id")
done
if [ ${#inflight[@]} -gt 0 ]; then
    tar -cf - -C "$work" "${inflight[@]}" | split -b 15M - "$OUT/inflight.tar.part-"
    echo "in flight, checkpointed: ${inflight[*]}" | tee -a "$OUT/$name.log"
fi
exit 0
