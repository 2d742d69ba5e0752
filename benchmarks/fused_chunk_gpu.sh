#!/bin/bash
# One device call: the fused chunk kernels at the MQAR shapes (benchmarks/fused_chunk_gpu.py: accuracy against
# float64, the table beside chunk-states, parallel, mode=auto and fla, the launch sweep). Output under $OUT.
# fla travels as wheels in .whl/ (git-ignored): pip download --no-deps flash-linear-attention fla-core -d .whl
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PWD:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
timeout "${BENCH_S:-570}" python3 benchmarks/fused_chunk_gpu.py --out "$OUT" --time-limit "${LIMIT_S:-520}" ${BENCH_ARGS} \
    2>&1 | tee "$OUT/fused_chunk.log"
