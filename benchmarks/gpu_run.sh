#!/bin/bash
# One device call: GPU tests of the Triton backend and the
# `rebased bench --suite` run whose tables are committed under benchmarks/results/. Logs go to $OUT.
# fla travels as wheels in .whl/ (git-ignored): pip download --no-deps flash-linear-attention fla-core.
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PWD:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout "${TEST_S:-240}" python3 -m pytest -q -p no:cacheprovider -o addopts=-ra tests/test_triton_ops.py ${TEST_ARGS} 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
timeout "${SUITE_S:-280}" python3 -m rebased bench --suite --out "$OUT/suite" ${SUITE_ARGS} 2>&1 | tee "$OUT/suite.log"
