"""Where an MQAR training step's GPU time goes, and what the fused LayerNorm and torch.compile change (CUDA).

    PYTHONPATH=. python benchmarks/mqar_profile_gpu.py [--cells rebased:64:128,rebased:64:2048] [--no-compile]

Per cell (model:d_model:L): ms per optimizer step (batch 512, the paper's settings, op path auto-triton;
`mqar_cost_gpu.seconds_per_step`) with torch's LayerNorm (twice: a process's first timing has run slow), with
the fused one (rebased.ops.norm), and with the fused one under torch.compile; then, with each LayerNorm, the
CUDA kernels of two eager steps by total time (torch.profiler), so a step's cost is attributed to kernels (the
linear-attention op, the norms, casts, the optimizer) rather than guessed.
"""

import argparse
import dataclasses
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
from mqar_cost_gpu import parse_cells, seconds_per_step, versions, with_norm_backend, with_op_path  # noqa: E402

from rebased.tasks.mqar.grids import MQARRun, paper_pairs  # noqa: E402
from rebased.tasks.mqar.sweep import build_model, make_data, train_config  # noqa: E402
from rebased.train import train  # noqa: E402

CELLS = "rebased:64:128,rebased:64:512,rebased:64:2048"


def profile_steps(run: MQARRun, norm: str) -> str:
    """The CUDA kernels of two eager optimizer steps (after one warm-up step), by total GPU time."""
    data = make_data(run)
    model = with_norm_backend(with_op_path(build_model(run), "auto", "triton"), norm)
    warm = dataclasses.replace(train_config(run), max_steps=1, early_stop_metric=None)
    train(model, (data.train.inputs, data.train.labels), warm, progress=False)
    config = dataclasses.replace(warm, max_steps=2)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        train(model, (data.train.inputs, data.train.labels), config, progress=False)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default=CELLS, help=f"model:d_model:L,... (default {CELLS})")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile timing")
    args = parser.parse_args()
    print(versions(), flush=True)
    variants = [("torch", False), ("torch", False), ("triton", False)] + [("triton", True)] * (not args.no_compile)
    for model, d_model, seq_len in parse_cells(args.cells):
        run = MQARRun(model, d_model, seq_len, paper_pairs(seq_len), 1e-3, train_examples=16 * 512, test_examples=512)
        for norm, compiled in variants:
            label = f"{model} d{d_model} L{seq_len} norm={norm} compile={compiled}"
            try:
                ms = seconds_per_step(run, "auto", "triton", compile=compiled, norm_backend=norm) * 1e3
                print(f"{label}: {ms:.1f} ms/step", flush=True)
            except Exception as error:  # noqa: BLE001 - report and go on
                print(f"{label}: FAILED {type(error).__name__}: {str(error)[:300]}", flush=True)
        for norm in ("torch", "triton"):
            print(f"\n{model} d{d_model} L{seq_len} norm={norm}: two steps under torch.profiler", flush=True)
            print(profile_steps(run, norm), flush=True)


if __name__ == "__main__":
    main()
