#!/bin/bash
# What bounds the fused chunk kernels at MQAR's L 2048 shape, from Nsight Compute (ncu) when the machine has it:
# per kernel (forward, dq, dk/dv) the speed of light (compute and memory throughput, % of peak), occupancy, and
# the warp-state statistics (which stall the warps spend their cycles in). Runs the op's forward and backward
# three times (benchmarks/fused_chunk_once.py): the first compiles, ncu profiles the third's launches.
#   bash benchmarks/fused_chunk_ncu.sh        # writes $OUT/fused_chunk_ncu.txt; at most NCU_S seconds (300)
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
report="$OUT/fused_chunk_ncu.txt"
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -z "$ncu" ]; then
    echo "ncu (Nsight Compute) not found on this machine: no instruction-level profile" | tee "$report"
    exit 0
fi
{
    echo "# bash benchmarks/fused_chunk_ncu.sh at ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo "?")}"
    "$ncu" --version | tail -1
} | tee "$report"
# the three kernels of the third run: 3 launches a run, so skip the first two runs' 6
timeout "${NCU_S:-300}" "$ncu" --kernel-name regex:fused_chunk --launch-skip 6 --launch-count 3 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    python3 benchmarks/fused_chunk_once.py --runs 3 2>&1 | tee -a "$report" | tail -40
