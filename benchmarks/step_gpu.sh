#!/bin/bash
# One device call for the MQAR training step, in stages (STAGES, default "tests launches step ablation split"; about
# 10 minutes in all: run "tests launches" and "step ablation split" as two calls), each capped at its *_S seconds:
# - tests: the GPU tests of the step's parts: the graphed step against the eager one and its sync-free replays,
#   the fused head + loss, the Triton softmax-gradient, head-loss tile, LayerNorm, embedding-gradient and short
#   convolution kernels, Mamba's selective scan, RWKV's WKV, and the fused chunk kernels at every MQAR model's value
#   dims ($OUT/step_tests.log);
# - launches: the fused chunk kernels' launch sweep (benchmarks/fused_chunk_gpu.py --sweep-only) at each value dim
#   of LAUNCH_DIMS, ReBased's polynomial or, written V:based, Based's (default "5 10 1 5:based 10:based": the
#   d_model 64 and 128 models', the ablation's d_model 16, Based at d_model 64 and 128), LAUNCH_S seconds each
#   (fused_chunk_v5.md, ..., fused_chunk_v10_based.md);
# - step: the step's cost (benchmarks/mqar_cost_gpu.py) at d_model 128, where the two head-loss paths are close:
#   as committed (graph-committed: the row kernel beyond TILED_MAX_DIM 64) against the tile kernels (graph-tiles),
#   3 repeats a cell (mqar_step.log);
# - ablation: the step at the kernel ablation's shapes (32 pairs; value dims 1 and 4) as committed against the
#   value dims padded to 8 (graph-committed-bv8), then its gamma x (+ beta) maps with the affine in torch (as
#   committed) against the LayerNorm's kernels without the norm (graph-committed-triton-affine)
#   (mqar_step_ablation.log);
# - split: value dims from 9 to 16 that are not powers of two in power-of-two pieces (10 as 8 + 2) against padded:
#   the op alone at B 512, L 2048, v 10 (fused_chunk_split.md), then the step at d_model 128, ReBased and Based
#   (graph-committed-split-values: mqar_step_split.log);
# - mamba: the selective scan kernels' launches against torch's chunked form, the op alone (scan_bench.py:
#   scan.md), then the Mamba MQAR step with its selective scan in torch's chunked form against the Triton kernels
#   (graph-committed-triton-scan), at L 512 and 2048 (mqar_step_mamba.log);
# - rwkv: the WKV kernels' launches against torch's chunked form, the op alone (wkv_bench.py: wkv.md), then the RWKV
#   MQAR step with the kernels (graph-committed-triton-wkv) and without, at L 512 and 2048 (mqar_step_rwkv.log);
# - norm: the fused LayerNorm's forward and backward launches at the step's shapes (layer_norm_bench.py:
#   layer_norm.md);
# - head_loss: the head-loss tile kernels' launches at an MQAR micro-batch, D 64 and 128 (head_loss_bench.py:
#   head_loss.md);
# - profile: the kernels of one graphed step at d_model 128, L 2048, by part (mqar_profile_gpu.py: mqar_profile.log;
#   PROFILE_CELLS, and PROFILE_PAIRS for other than the paper's L / 4 key-value pairs);
# - stack: the step at 4 times the paper's batch (--batch-scales 1,4: the most a stacked model of 4 runs could
#   gain), at the kernel ablation's shapes (32 pairs) and paper-fig1's (stack_bound.log);
# - compile: the step with the forward under torch.compile inside the graph (mqar_step_compile.log);
# - others: the step of the rest of Fig. 1's models (ConvAttention, Mamba, RWKV) at L 512 and 2048, to size
#   their runs (mqar_step_others.log).
#   STAGES="tests launches" bash benchmarks/step_gpu.sh
#   STAGES="step" CELLS=rebased:64:2048 VARIANTS=graph-committed,graph-committed-torch-conv bash benchmarks/step_gpu.sh
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
# Triton's compiled kernels in the repository's .triton_cache (git-ignored; carry it), as mqar_sweep_gpu.sh keeps
# them: kernels compiled here reach a later call through the cache a sweep call sends back
export TRITON_CACHE_DIR=$PWD/.triton_cache
stages=" ${STAGES:-tests launches step ablation split} "
commit=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo "?")}
{
    echo "# STAGES=\"${STAGES:-tests launches step ablation split}\" bash benchmarks/step_gpu.sh at $commit"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/step_tests.log"
cost=(python3 benchmarks/mqar_cost_gpu.py auto-triton)
# fused_chunk NAME SECONDS ARGS...: benchmarks/fused_chunk_gpu.py ARGS, capped at SECONDS, into $OUT/NAME.md and .log
fused_chunk() {
    local name=$1 seconds=$2
    shift 2
    timeout "$seconds" python3 benchmarks/fused_chunk_gpu.py --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
    mv "$OUT/$name/fused_chunk.md" "$OUT/$name.md" 2>/dev/null
    rm -rf "${OUT:?}/$name"
}

if [[ $stages == *" tests "* ]]; then
    timeout "${TEST_S:-100}" python3 -m pytest -q -p no:cacheprovider -o addopts=-ra -m gpu \
        tests/test_train.py tests/test_triton_cross_entropy.py tests/test_cross_entropy.py \
        tests/test_triton_head_loss.py tests/test_layer_norm.py tests/test_triton_embedding.py \
        tests/test_triton_short_conv.py tests/test_triton_selective_scan.py tests/test_triton_wkv.py \
        2>&1 | tee -a "$OUT/step_tests.log" | tail -8
    timeout "${CHUNK_TEST_S:-300}" python3 -m pytest -q -p no:cacheprovider -o addopts=-ra -m gpu \
        tests/test_triton_fused_chunk.py -k gpu_mqar_shape 2>&1 | tee -a "$OUT/step_tests.log" | tail -4
fi
if [[ $stages == *" launches "* ]]; then
    for case in ${LAUNCH_DIMS:-5 10 1 5:based 10:based}; do
        value_dim=${case%%:*}
        kernel=rebased
        [[ $case == *:* ]] && kernel=${case#*:}
        name=fused_chunk_v$value_dim$([[ $kernel == rebased ]] || echo "_$kernel")
        fused_chunk "$name" "$(( ${LAUNCH_S:-100} + 20 ))" --sweep-only --sweep-value-dim "$value_dim" \
            --sweep-kernel "$kernel" --time-limit "${LAUNCH_S:-100}"
        tail -16 "$OUT/$name.log"
    done
fi
if [[ $stages == *" step "* ]]; then
    timeout "${BENCH_S:-200}" "${cost[@]}" --variants "${VARIANTS:-graph-committed,graph-tiles}" --repeats 3 \
        --cells "${CELLS:-rebased:128:2048,based:128:2048,rebased:128:1024}" 2>&1 | tee "$OUT/mqar_step.log"
fi
if [[ $stages == *" ablation "* ]]; then
    timeout "${ABLATION_S:-120}" "${cost[@]}" --variants graph-committed,graph-committed-bv8 --pairs 32 \
        --cells "${ABLATION_CELLS:-rebased:16:2048,rebased:48:2048,rebased:16:256}" 2>&1 | tee "$OUT/mqar_step_ablation.log"
    timeout "${AFFINE_S:-90}" "${cost[@]}" --variants graph-committed,graph-committed-triton-affine --pairs 32 \
        --cells "${AFFINE_CELLS:-gamma_square:48:2048,affine_square:48:2048}" 2>&1 | tee -a "$OUT/mqar_step_ablation.log"
fi
if [[ $stages == *" split "* ]]; then
    fused_chunk fused_chunk_split "${SPLIT_OP_S:-90}" --table-only --time-limit 70 --entries "fused,fused split-values" \
        --lengths 2048 --value-dims 10
    tail -6 "$OUT/fused_chunk_split.log"
    timeout "${SPLIT_S:-120}" "${cost[@]}" --variants graph-committed,graph-committed-split-values \
        --cells "${SPLIT_CELLS:-rebased:128:2048,based:128:2048}" 2>&1 | tee "$OUT/mqar_step_split.log"
fi
# sweep NAME SECONDS SCRIPT: a launch sweep's table into $OUT/NAME.md, under a line naming the commit
sweep() {
    echo "# python3 benchmarks/$3 at $commit" > "$OUT/$1.md"
    timeout "$2" python3 "benchmarks/$3" >> "$OUT/$1.md" 2>&1
    tail -12 "$OUT/$1.md"
}
if [[ $stages == *" norm "* ]]; then
    sweep layer_norm "${NORM_S:-240}" layer_norm_bench.py
fi
if [[ $stages == *" head_loss "* ]]; then
    sweep head_loss "${HEAD_S:-270}" head_loss_bench.py
fi
if [[ $stages == *" mamba "* ]]; then
    sweep scan "${SCAN_S:-150}" scan_bench.py
    timeout "${MAMBA_S:-150}" "${cost[@]}" --variants graph-committed-triton-scan,graph-committed \
        --cells "${MAMBA_CELLS:-mamba:64:512,mamba:64:2048}" 2>&1 | tee "$OUT/mqar_step_mamba.log"
fi
if [[ $stages == *" rwkv "* ]]; then
    sweep wkv "${WKV_S:-150}" wkv_bench.py
    timeout "${RWKV_S:-150}" "${cost[@]}" --variants graph-committed-triton-wkv,graph-committed \
        --cells "${RWKV_CELLS:-rwkv:64:512,rwkv:64:2048}" 2>&1 | tee "$OUT/mqar_step_rwkv.log"
fi
if [[ $stages == *" profile "* ]]; then
    timeout "${PROFILE_S:-60}" python3 benchmarks/mqar_profile_gpu.py --cells "${PROFILE_CELLS:-rebased:128:2048}" \
        --kernels-only --variant "${PROFILE_VARIANT:-graph-committed}" ${PROFILE_PAIRS:+--pairs "$PROFILE_PAIRS"} \
        2>&1 | tee "$OUT/mqar_profile.log"
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
