#!/bin/bash
# One device call: every GPU test, the chunk kernel's (the most recently changed code) first, so that a
# cut-off call still says what matters most. Logs to $OUT. Carry .whl (fla) only for the suite, not needed here.
#   NEW="dims or step or chunk" bash benchmarks/verify_gpu.sh   # about 6 minutes (53 tests; Triton compiles dominate)
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
new="${NEW:-chunk}"  # the tests run first
timeout "${NEW_S:-220}" python3 -m pytest -q -p no:cacheprovider -m gpu tests/ -k "$new" 2>&1 | tee "$OUT/pytest_gpu_new.log" | tail -8
timeout "${REST_S:-330}" python3 -m pytest -q -p no:cacheprovider -m gpu tests/ -k "not ($new)" 2>&1 | tee "$OUT/pytest_gpu_rest.log" | tail -8
