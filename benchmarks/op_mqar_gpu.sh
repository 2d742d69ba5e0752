#!/bin/bash
# One device call for the op at MQAR's shapes: `rebased bench --suite` at batch x L = 1,048,576 tokens, 12 heads,
# q/k 16, v 5, L 256-2048, beside fla (from .whl/, carried) and SDPA ($OUT/suite/bench.md, rewritten after every
# row, so a cut-off suite keeps its rows), then the fused kernels under Nsight Compute where the machine has it
# (benchmarks/fused_chunk_ncu.sh: $OUT/fused_chunk_ncu.txt). Capped at SUITE_S + NCU_S seconds (330 + 240).
#   bash benchmarks/op_mqar_gpu.sh            # carry .whl
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PWD:/tmp/site
fi
timeout "${SUITE_S:-330}" python3 -c "import sys; from rebased.cli import main; sys.exit(main(sys.argv[1:]))" \
    bench --suite --heads 12 --head-dim 16 --value-dim 5 --tokens 1048576 --lengths 256,512,1024,2048 \
    --entries chunk/triton,parallel/triton --decode-contexts 2048 --out "$OUT/suite" 2>&1 \
    | grep -v "UserWarning\|scaled_dot_product_attention(q, k, v" | tail -40
NCU_S=${NCU_S:-240} bash benchmarks/fused_chunk_ncu.sh
