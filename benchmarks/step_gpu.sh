#!/bin/bash
# One device call for the MQAR training step, in stages (STAGES, default "tests step profile"), each capped at
# its *_S seconds:
# - tests: the GPU tests of the step's parts: the graphed step against the eager one and its sync-free replays,
#   the fused head + loss, the Triton softmax-gradient, head-loss tile, LayerNorm, embedding-gradient and short
#   convolution kernels, and the fused chunk kernels at the kernel ablation's value dims ($OUT/step_tests.log);
# - step: the step's cost (benchmarks/mqar_cost_gpu.py) as committed (graph-committed) against the short
#   convolution's kernels (graph-committed-short-conv); at L 2048 with the whole batch in one micro-batch
#   (MICRO_BATCHES); and with the head-loss tiles at d_model 128 (graph-tiles), where the committed loss takes
#   the row kernel (mqar_step.log);
# - profile: the kernels of one graphed step at L 2048, by part (mqar_profile_gpu.py: mqar_profile.log);
# - stack: the step at 4 times the paper's batch (--batch-scales 1,4: the most a stacked model of 4 runs could
#   gain), at the kernel ablation's shapes (32 pairs) and paper-fig1's (stack_bound.log);
# - compile: the step with the forward under torch.compile inside the graph (mqar_step_compile.log);
# - others: the step of the rest of Fig. 1's models (ConvAttention, Mamba, RWKV) at L 512 and 2048, to size
#   their runs (mqar_step_others.log).
#   bash benchmarks/step_gpu.sh
#   STAGES="step" CELLS=rebased:64:2048 MICRO_BATCHES=524288 bash benchmarks/step_gpu.sh
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
stages=" ${STAGES:-tests step profile} "
{
    echo "# STAGES=\"${STAGES:-tests step profile}\" bash benchmarks/step_gpu.sh at ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo "?")}"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/step_tests.log"
cost=(python3 benchmarks/mqar_cost_gpu.py auto-triton)

if [[ $stages == *" tests "* ]]; then
    timeout "${TEST_S:-100}" python3 -m pytest -q -p no:cacheprovider -o addopts=-ra -m gpu \
        tests/test_train.py tests/test_triton_cross_entropy.py tests/test_cross_entropy.py \
        tests/test_triton_head_loss.py tests/test_layer_norm.py tests/test_triton_embedding.py \
        tests/test_triton_short_conv.py \
        2>&1 | tee -a "$OUT/step_tests.log" | tail -8
    timeout "${ABLATION_TEST_S:-60}" python3 -m pytest -q -p no:cacheprovider -o addopts=-ra -m gpu \
        tests/test_triton_fused_chunk.py -k "gpu_mqar_shape and ablation" 2>&1 | tee -a "$OUT/step_tests.log" | tail -4
fi
if [[ $stages == *" step "* ]]; then
    {
        timeout "${BENCH_S:-120}" "${cost[@]}" --variants graph-committed,graph-committed-short-conv \
            --cells "${CELLS:-rebased:64:512,rebased:64:2048,rebased:128:2048,based:64:2048}"
        timeout "${MICRO_S:-60}" "${cost[@]}" --variants graph-committed --cells rebased:64:2048,rebased:128:2048 \
            --micro-batch-tokens "${MICRO_BATCHES:-1048576}"
        timeout "${TILES_S:-60}" "${cost[@]}" --variants graph-committed,graph-tiles --cells "${WIDE_CELLS:-rebased:128:1024}"
        timeout "${TILES_S:-60}" "${cost[@]}" --variants graph-tiles --cells rebased:128:2048
    } 2>&1 | tee "$OUT/mqar_step.log"
fi
if [[ $stages == *" profile "* ]]; then
    timeout "${PROFILE_S:-60}" python3 benchmarks/mqar_profile_gpu.py --cells "${PROFILE_CELLS:-rebased:64:2048}" \
        --kernels-only --variant "${PROFILE_VARIANT:-graph-committed-short-conv}" 2>&1 | tee "$OUT/mqar_profile.log"
fi
if [[ $stages == *" stack "* ]]; then
    {
        timeout "${STACK_S:-70}" "${cost[@]}" --variants graph-committed --batch-scales 1,4 \
            --cells rebased:16:256,rebased:48:2048 --pairs 32
        timeout "${STACK_S:-70}" "${cost[@]}" --variants graph-committed --batch-scales 1,4 \
            --cells rebased:64:512,rebased:128:1024
    } 2>&1 | tee "$OUT/stack_bound.log"
fi
if [[ $stages == *" compile "* ]]; then
    timeout "${COMPILE_S:-80}" "${cost[@]}" --variants graph-committed-compile --cells rebased:64:2048 \
        2>&1 | tee "$OUT/mqar_step_compile.log"
fi
if [[ $stages == *" others "* ]]; then
    timeout "${OTHERS_S:-150}" "${cost[@]}" --variants graph-committed \
        --cells "${OTHER_CELLS:-attention:64:512,mamba:64:512,rwkv:64:512,attention:64:2048,mamba:64:2048,rwkv:64:2048}" \
        2>&1 | tee "$OUT/mqar_step_others.log"
fi
