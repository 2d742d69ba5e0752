#!/bin/bash
# One device call per model of the language-model experiment (results/lm/): train a pile_150m model on the
# composite corpus for 1,526 steps of 65,536 tokens (100M tokens), then score it in-domain (the corpus's
# validation split) and out-of-domain (the whole general-English part, which training never saw).
#   KIND=rebased bash benchmarks/lm_experiment_gpu.sh     # about 7 minutes on one H200
# The shards travel as .lmdata/corpus.tar.xz (git-ignored; carry it), holding train-domain/ and
# general-english/ as `rebased data corpus` and `rebased data prepare --tokenizer gpt-neox-20b` made them.
# Writes to $OUT: the run's metrics.jsonl, run.json and eval.json, and the call's log.
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
kind="${KIND:?KIND=rebased, based or attention}"
data=/tmp/lmdata run=/tmp/lm-$kind log="$OUT/$kind.log"
{
    echo "# KIND=$kind bash benchmarks/lm_experiment_gpu.sh at ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo "?")}"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    mkdir -p $data && python3 -c "import tarfile, sys; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" \
        .lmdata/corpus.tar.xz $data
    start=$(date +%s)
    timeout "${TRAIN_S:-480}" python3 -m rebased train $data/train-domain --out $run --preset pile_150m \
        --model kind="$kind" --seq-len 2048 --batch-tokens 65536 --steps "${STEPS:-1526}"
    echo "train: $(( $(date +%s) - start )) s"
    python3 -m rebased eval $run --data $data/train-domain --batch-size 16
    python3 -m rebased eval $run --data $data/general-english --split train --batch-size 16
    echo "train + eval: $(( $(date +%s) - start )) s"
} 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tee "$log" | tail -40
for f in metrics.jsonl run.json eval.json; do cp "$run/$f" "$OUT/$kind.$f" 2>/dev/null; done
