#!/bin/bash
# One device call for the models and MQAR issues: the GPU smoke run of every mixer (bf16 autocast forward
# and backward, decoding, generation), then MQAR sweep throughput: the same 8 runs (ReBased and Based,
# d_model 64, L 128, the paper's four learning rates, one epoch of 100k examples) one at a time and with
# 8 worker processes sharing the GPU. Logs and timings go to $OUT.
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout "${SMOKE_S:-150}" python3 tests/gpu_smoke.py --device cuda 2>&1 | tee "$OUT/smoke.log"
sweep=(paper-fig1 --models rebased,based --set d_model=64 --set seq_len=128 --set num_kv_pairs=16 --set epochs=1)
for workers in 1 8; do
    start=$(date +%s.%N)
    timeout "${SWEEP_S:-150}" python3 -m rebased mqar "${sweep[@]}" --workers $workers --out "/tmp/mqar-w$workers" \
        2>&1 | tee "$OUT/mqar_workers$workers.log"
    end=$(date +%s.%N)
    python3 -c "import sys; s = float(sys.argv[2]) - float(sys.argv[1]); print(f'workers $workers: 8 runs in {s:.1f} s = {8 * 3600 / s:.0f} runs per GPU-hour')" "$start" "$end" | tee -a "$OUT/throughput.txt"
    cp "/tmp/mqar-w$workers/results.jsonl" "$OUT/results_workers$workers.jsonl" 2>/dev/null
done
