#!/bin/bash
# One device call that sweeps the launches of the MQAR step's Triton kernels chosen without timings, each
# stage capped in seconds (HEAD_S + NORM_S = 510): the head-loss tile kernels (benchmarks/head_loss_bench.py:
# $OUT/head_loss.md) and the fused LayerNorm (benchmarks/layer_norm_bench.py: $OUT/layer_norm.md). Each table
# ends with the fastest launches within tolerance, to set in rebased/ops/triton/head_loss.py and layer_norm.py.
#   bash benchmarks/launch_sweeps_gpu.sh
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
echo "# bash benchmarks/launch_sweeps_gpu.sh at ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo "?")}" \
    | tee "$OUT/head_loss.md" > "$OUT/layer_norm.md"
timeout "${HEAD_S:-270}" python3 benchmarks/head_loss_bench.py 2>&1 | tee -a "$OUT/head_loss.md"
timeout "${NORM_S:-240}" python3 benchmarks/layer_norm_bench.py 2>&1 | tee -a "$OUT/layer_norm.md"
