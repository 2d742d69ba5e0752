#!/bin/bash
# After a GPU call of benchmarks/mqar_sweep_gpu.sh, in the working copy: take what the call sent back for
# EXPERIMENT (DIR/EXPERIMENT, DIR being the call's files) into the repository: results.jsonl over the committed
# one, the runs in flight into .sweep/EXPERIMENT (for the next call to carry), Triton's cache (DIR) into
# .triton_cache, then remake summary.md and accuracy.png. Prints the runs the call finished and their steps (a
# row of the results README's call table).
#   EXPERIMENT=paper-fig1 ARGS="--models rebased,based" bash benchmarks/mqar_sweep_unpack.sh DIR
# ARGS are the report's `rebased mqar` options (the grid whose summary to write), not the call's subset.
set -e
cd "$(dirname "$0")/.."
dir=${1:?usage: bash benchmarks/mqar_sweep_unpack.sh DIR, the folder of the device call files}
experiment=${EXPERIMENT:-paper-fig1}
files=$dir/$experiment
[ -f "$files/results.jsonl" ] || { echo "no results.jsonl in $files: nothing taken" >&2; exit 1; }
python3 - "results/mqar/$experiment/results.jsonl" "$files/results.jsonl" <<'PY'
import sys
from pathlib import Path

from rebased.tasks.mqar.sweep import load_results

before = {r["run_id"] for r in load_results(Path(sys.argv[1]))}
fresh = [r for r in load_results(Path(sys.argv[2])) if r["run_id"] not in before]
steps = sum(r["steps"] for r in fresh)
print(f"this call finished {len(fresh)} runs, {steps:,} steps:", ", ".join(r["run_id"] for r in fresh) or "-")
PY
mkdir -p "results/mqar/$experiment"
cp "$files/results.jsonl" "results/mqar/$experiment/results.jsonl"
rm -rf ".sweep/$experiment" && mkdir -p .sweep
if ls "$files"/inflight.tgz.* >/dev/null 2>&1; then
    cat "$files"/inflight.tgz.* | tar xzf - -C .sweep
fi
if [ -f "$dir/triton_cache.tgz" ]; then
    rm -rf .triton_cache && tar xzf "$dir/triton_cache.tgz"
fi
echo "in flight now:" ".sweep/$experiment/runs/"*
[ -s "results/mqar/$experiment/results.jsonl" ] || { echo "no finished runs yet: no summary"; exit 0; }
# shellcheck disable=SC2086  # ARGS is a list of options
python3 -c "import sys; from rebased.cli import main; sys.exit(main(sys.argv[1:]))" \
    mqar "$experiment" ${ARGS} --out "results/mqar/$experiment" --report | tail -3
