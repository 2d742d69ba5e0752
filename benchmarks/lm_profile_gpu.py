"""Where a language-model training step's time goes: the CUDA kernels of a few optimizer steps of a
`pile_150m` model through the training loop (random tokens), by total GPU time, and the step's wall time
against its GPU time (a gap means the host bounds the step).

    python benchmarks/lm_profile_gpu.py --models rebased,attention --seq-len 2048 --tokens 65536
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from rebased.bench.train_throughput import RandomTokens
from rebased.model import LanguageModel
from rebased.presets import preset
from rebased.tasks.lm.train import padded_vocab
from rebased.train import TrainConfig, train


def profile_model(kind: str, seq_len: int, tokens: int, steps: int, rows: int, pad: bool) -> None:
    torch.manual_seed(0)
    cfg = preset("pile_150m", kind=kind)
    if pad:  # as `rebased train` builds it
        cfg = cfg.replace(vocab_size=padded_vocab(cfg.vocab_size))
    batch = tokens // seq_len
    config = TrainConfig(epochs=1, batch_size=batch, lr=1e-3, schedule="constant", early_stop_metric=None)
    warm = LanguageModel(cfg)
    train(warm, RandomTokens(batch * 3, seq_len, cfg.vocab_size), config, progress=False)  # compile, autotune
    model = LanguageModel(cfg)
    examples = RandomTokens(batch * steps, seq_len, cfg.vocab_size)
    torch.cuda.synchronize()
    began = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        train(model, examples, config, progress=False)
        torch.cuda.synchronize()
    wall = time.perf_counter() - began
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events)
    print(f"\n## {kind}, L {seq_len}, {batch} x {seq_len} tokens a step, vocab {cfg.vocab_size}, {steps} steps")
    print(f"wall {1e3 * wall / steps:.1f} ms a step, GPU busy {gpu_us / 1e3 / steps:.1f} ms a step (with profiling)")
    print(events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="rebased,attention")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rows", type=int, default=18)
    parser.add_argument("--no-pad", action="store_true", help="keep the preset's vocabulary (50,277) unpadded")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}")
    for kind in args.models.split(","):
        profile_model(kind, args.seq_len, args.tokens, args.steps, args.rows, pad=not args.no_pad)


if __name__ == "__main__":
    main()
