#!/bin/bash
# One device call for the MQAR training step, in stages (STAGES, default "tests wide step profile"), each capped at
# its *_S seconds:
# - tests: the GPU tests of the step's parts: the graphed step against the eager one and its sync-free replays,
#   the fused head + loss, the Triton softmax-gradient, head-loss tile, LayerNorm, embedding-gradient and short
#   convolution kernels, and the fused chunk kernels at the kernel ablation's value dims ($OUT/step_tests.log);
# - wide: the fused chunk kernels' launch sweep at value dim 10, the d_model 128 models' (GPU_LAUNCHES_WIDE:
#   benchmarks/fused_chunk_gpu.py --sweep-only --sweep-value-dim 10: fused_chunk_wide.md);
# - step: the step's cost (benchmarks/mqar_cost_gpu.py) at d_model 128, where the two head-loss paths are close:
#   as committed (graph-committed: the row kernel beyond TILED_MAX_DIM 64) against the tile kernels (graph-tiles),
#   5 repeats a cell (mqar_step.log);
# - profile: the kernels of one graphed step at d_model 128, L 2048, by part (mqar_profile_gpu.py: mqar_profile.log);
# - stack: the step at 4 times the paper's batch (--batch-scales 1,4: the most a stacked model of 4 runs could
#   gain), at the kernel ablation's shapes (32 pairs) and paper-fig1's (stack_bound.log);
# - compile: the step with the forward under torch.compile inside the graph (mqar_step_compile.log);
# - others: the step of the rest of Fig. 1's models (ConvAttention, Mamba, RWKV) at L 512 and 2048, to size
#   their runs (mqar_step_others.log).
#   bash benchmarks/step_gpu.sh
#   STAGES="step" CELLS=rebased:64:2048 VARIANTS=graph-committed,graph-committed-torch-conv bash benchmarks/step_gpu.sh
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
stages=" ${STAGES:-tests wide step profile} "
{
    echo "# STAGES=\"${STAGES:-tests wide step profile}\" bash benchmarks/step_gpu.sh at ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo "?")}"
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
if [[ $stages == *" wide "* ]]; then
    timeout "${WIDE_S:-170}" python3 benchmarks/fused_chunk_gpu.py --out "$OUT/wide" --sweep-only --sweep-value-dim 10 \
        --time-limit "${WIDE_LIMIT_S:-150}" > "$OUT/fused_chunk_wide.log" 2>&1
    cp "$OUT/wide/fused_chunk.md" "$OUT/fused_chunk_wide.md" 2>/dev/null && rm -r "$OUT/wide"
    tail -20 "$OUT/fused_chunk_wide.log"
fi
if [[ $stages == *" step "* ]]; then
    timeout "${BENCH_S:-150}" "${cost[@]}" --variants "${VARIANTS:-graph-committed,graph-tiles}" --repeats 5 \
        --cells "${CELLS:-rebased:128:2048,based:128:2048,rebased:128:1024}" 2>&1 | tee "$OUT/mqar_step.log"
fi
if [[ $stages == *" profile "* ]]; then
    timeout "${PROFILE_S:-60}" python3 benchmarks/mqar_profile_gpu.py --cells "${PROFILE_CELLS:-rebased:128:2048}" \
        --kernels-only --variant "${PROFILE_VARIANT:-graph-committed}" 2>&1 | tee "$OUT/mqar_profile.log"
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
