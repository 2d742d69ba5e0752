#!/bin/bash
# Second device call: which shapes crash the Triton chunk kernel (MQAR's value dim is d_model // 12 = 5),
# then sweep throughput with the softmax-attention MQAR models (no Triton), 8 runs one at a time vs 8 workers.
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
timeout 120 python3 benchmarks/triton_shapes_gpu.py 2>&1 | tee "$OUT/triton_shapes.log"
sweep=(paper-fig1 --models attention --set seq_len=128 --set num_kv_pairs=16 --set epochs=1)
for workers in 1 8; do
    start=$(date +%s.%N)
    timeout 100 python3 -m rebased mqar "${sweep[@]}" --workers $workers --out "/tmp/mqar-w$workers" 2>&1 | tail -12 | tee "$OUT/mqar_workers$workers.log"
    end=$(date +%s.%N)
    python3 -c "import sys; s = float(sys.argv[2]) - float(sys.argv[1]); print(f'workers $workers: 16 runs in {s:.1f} s = {16 * 3600 / s:.0f} runs per GPU-hour')" "$start" "$end" | tee -a "$OUT/throughput.txt"
    cp "/tmp/mqar-w$workers/results.jsonl" "$OUT/results_workers$workers.jsonl" 2>/dev/null
done
