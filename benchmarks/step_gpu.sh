#!/bin/bash
# One device call for the MQAR training step, each stage capped (TEST_S, BENCH_S, ... seconds; 580 in all):
# - the GPU tests of its parts: the graphed step against the eager one and its sync-free replays, the fused head
#   + loss, the Triton softmax-gradient, head-loss tile and embedding-gradient kernels, and the fused chunk
#   kernels at the kernel ablation's value dims ($OUT/step_tests.log);
# - the step's cost by variant (benchmarks/mqar_cost_gpu.py): graph-committed, what sweeps run, against
#   graph-committed-embedding, with the embedding kernel (mqar_step.log);
# - the kernels of one graphed step at L 2048, d_model 64 and 128, by part (mqar_profile_gpu.py: mqar_profile.log);
# - the step at 4 times the paper's batch (--batch-scales 1,4: the most a stacked model of 4 runs could gain), at
#   the kernel ablation's shapes (32 pairs) and paper-fig1's (stack_bound.log);
# - the step with the forward under torch.compile inside the graph (mqar_step_compile.log).
#   bash benchmarks/step_gpu.sh
#   CELLS=rebased:64:2048 VARIANTS=fused,graph bash benchmarks/step_gpu.sh
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
{
    echo "# bash benchmarks/step_gpu.sh at ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo "?")}"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/step_tests.log"
timeout "${TEST_S:-90}" python3 -m pytest -q -p no:cacheprovider -o addopts=-ra -m gpu \
    tests/test_train.py tests/test_triton_cross_entropy.py tests/test_cross_entropy.py tests/test_triton_head_loss.py \
    tests/test_triton_embedding.py 2>&1 | tee -a "$OUT/step_tests.log" | tail -8
# the fused chunk kernels at the kernel ablation's value dims (1, 2, 4), before its sweep runs them
timeout "${ABLATION_TEST_S:-60}" python3 -m pytest -q -p no:cacheprovider -o addopts=-ra -m gpu \
    tests/test_triton_fused_chunk.py -k "gpu_mqar_shape and ablation" 2>&1 | tee -a "$OUT/step_tests.log" | tail -4
cells="${CELLS:-rebased:64:512,rebased:64:2048,rebased:128:2048,based:64:2048}"
timeout "${BENCH_S:-110}" python3 benchmarks/mqar_cost_gpu.py auto-triton --cells "$cells" \
    --variants "${VARIANTS:-graph-committed,graph-committed-embedding}" 2>&1 | tee "$OUT/mqar_step.log"
timeout "${PROFILE_S:-100}" python3 benchmarks/mqar_profile_gpu.py --cells rebased:64:2048,rebased:128:2048 --kernels-only \
    --variant "${PROFILE_VARIANT:-graph-committed-embedding}" 2>&1 | tee "$OUT/mqar_profile.log"
# what stacking 4 runs into one model could gain at most: the paper's batch against 4 times it, per 512 examples
{
    timeout "${STACK_S:-70}" python3 benchmarks/mqar_cost_gpu.py auto-triton --variants graph-committed --batch-scales 1,4 \
        --cells rebased:16:256,rebased:48:2048 --pairs 32
    timeout "${STACK_S:-70}" python3 benchmarks/mqar_cost_gpu.py auto-triton --variants graph-committed --batch-scales 1,4 \
        --cells rebased:64:512,rebased:128:1024
} 2>&1 | tee "$OUT/stack_bound.log"
# the step with the model's forward under torch.compile, inside the graph
timeout "${COMPILE_S:-80}" python3 benchmarks/mqar_cost_gpu.py auto-triton --variants graph-committed-compile \
    --cells rebased:64:2048 2>&1 | tee "$OUT/mqar_step_compile.log"
