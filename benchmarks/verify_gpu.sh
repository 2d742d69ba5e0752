#!/bin/bash
# One device call: every GPU test (pytest -m gpu tests/), the chunk kernels' first, so that a cut-off call
# still says what matters most. Writes $OUT/gpu_tests.log: the GPU, torch and triton versions, then both
# pytest runs. A run that passes on a new Triton version is what rebased/ops/triton/versions.py's
# VERIFIED_TRITON names (committed as benchmarks/results/h200/gpu_tests.log). REBASED_TRUST_TRITON=1 makes
# the tests that go through backend="auto" run the fused kernels on an unverified version too.
#   bash benchmarks/verify_gpu.sh          # 6-8 minutes on a fresh machine (Triton compiles dominate)
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD REBASED_TRUST_TRITON=1
log="$OUT/gpu_tests.log"
{
    echo "# bash benchmarks/verify_gpu.sh (NEW=\"${NEW:-chunk}\") at ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo "?")}"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$log"
new="${NEW:-chunk}"  # the tests run first
timeout "${NEW_S:-420}" python3 -m pytest -q -p no:cacheprovider -o addopts=-ra -m gpu tests/ -k "$new" 2>&1 | tee -a "$log" | tail -8
timeout "${REST_S:-330}" python3 -m pytest -q -p no:cacheprovider -o addopts=-ra -m gpu tests/ -k "not ($new)" 2>&1 | tee -a "$log" | tail -8
