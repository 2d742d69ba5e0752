#!/bin/bash
# One device call: seconds per MQAR step by op path.
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
for path in chunk-torch parallel-torch chunk-triton; do
    timeout 150 python3 benchmarks/mqar_cost_gpu.py $path 2>&1 | grep -v Warning | tee -a "$OUT/mqar_cost.log"
done
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> "$OUT/mqar_cost.log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/mqar_cost.log"
