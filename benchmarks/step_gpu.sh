#!/bin/bash
# One device call for the MQAR training step: first the GPU tests of its parts (the graphed step against the
# eager one and its sync-free replays, the fused head + loss, the Triton softmax-gradient, head-loss tile and
# embedding-gradient kernels), then the step's cost by variant (benchmarks/mqar_cost_gpu.py --variants:
# graph-tiles, the graphed step sweeps run, against graph-tiles-embedding, with the embedding kernel), the head +
# loss alone (benchmarks/loss_bench.py), the kernels of one graphed step at L 2048 by part
# (benchmarks/mqar_profile_gpu.py), the LayerNorm's launch sets (benchmarks/layer_norm_bench.py), and the step at
# 4 times the paper's batch (mqar_cost_gpu.py --batch-scales 1,4: the most a stacked model of 4 runs could gain),
# at the kernel ablation's shapes (32 pairs) and paper-fig1's.
# Writes $OUT/step_tests.log, mqar_step.log, loss.md, mqar_profile.log, layer_norm.md and stack_bound.log.
#   bash benchmarks/step_gpu.sh       # at most 10 minutes (TEST_S + BENCH_S + LOSS_S + PROFILE_S + NORM_S + 2 STACK_S)
#   CELLS=rebased:64:2048 VARIANTS=fused,graph bash benchmarks/step_gpu.sh
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
{
    echo "# bash benchmarks/step_gpu.sh at ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo "?")}"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/step_tests.log"
timeout "${TEST_S:-120}" python3 -m pytest -q -p no:cacheprovider -o addopts=-ra -m gpu \
    tests/test_train.py tests/test_triton_cross_entropy.py tests/test_cross_entropy.py tests/test_triton_head_loss.py \
    tests/test_triton_embedding.py 2>&1 | tee -a "$OUT/step_tests.log" | tail -8
cells="${CELLS:-rebased:64:128,rebased:64:512,rebased:64:2048,rebased:128:2048}"
timeout "${BENCH_S:-135}" python3 benchmarks/mqar_cost_gpu.py auto-triton --cells "$cells" \
    --variants "${VARIANTS:-graph-tiles,graph-tiles-embedding}" 2>&1 | tee "$OUT/mqar_step.log"
timeout "${LOSS_S:-45}" python3 benchmarks/loss_bench.py --device cuda --bf16 --variants plain,fused-triton,fused-tiles \
    --cases 262144:8192:64,262144:8192:128,65536:50304:768 2>&1 | tee "$OUT/loss.md"
timeout "${PROFILE_S:-90}" python3 benchmarks/mqar_profile_gpu.py --cells rebased:64:2048 --kernels-only \
    --variant "${PROFILE_VARIANT:-graph-tiles-embedding}" 2>&1 | tee "$OUT/mqar_profile.log"
timeout "${NORM_S:-60}" python3 benchmarks/layer_norm_bench.py 2>&1 | tee "$OUT/layer_norm.md"
# what stacking 4 runs into one model could gain at most: the paper's batch against 4 times it, per 512 examples
{
    timeout "${STACK_S:-75}" python3 benchmarks/mqar_cost_gpu.py auto-triton --variants graph-tiles --batch-scales 1,4 \
        --cells rebased:16:256,rebased:48:2048 --pairs 32
    timeout "${STACK_S:-75}" python3 benchmarks/mqar_cost_gpu.py auto-triton --variants graph-tiles --batch-scales 1,4 \
        --cells rebased:64:512,rebased:128:1024
} 2>&1 | tee "$OUT/stack_bound.log"
