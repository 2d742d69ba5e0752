"""Where an MQAR training step's GPU time goes, and what torch.compile changes (one device call).

    python benchmarks/mqar_profile_gpu.py            # CELLS=rebased:64:128,... for other cells

Per cell: ms per optimizer step (batch 512, paper settings; `mqar_cost_gpu.seconds_per_step`) with torch's
LayerNorm and with the fused one (rebased.ops.norm), eager and compiled, then the CUDA kernels of two eager
steps by total time (torch.profiler), so the step's cost is attributed to kernels (the linear-attention op,
elementwise glue, the optimizer) rather than guessed.
"""

import dataclasses
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
from mqar_cost_gpu import seconds_per_step, with_op_path  # noqa: E402

from rebased.tasks.mqar.grids import MQARRun, paper_pairs  # noqa: E402
from rebased.tasks.mqar.sweep import build_model, make_data, train_config  # noqa: E402
from rebased.train import train  # noqa: E402

CELLS = [("rebased", 64, 128), ("rebased", 64, 512), ("rebased", 64, 2048)]
if "CELLS" in os.environ:
    CELLS = [(m, int(d), int(length)) for m, d, length in (c.split(":") for c in os.environ["CELLS"].split(","))]


def profile_steps(run: MQARRun) -> str:
    data = make_data(run)
    model = with_op_path(build_model(run), "auto", "triton")  # the fused LayerNorm: backend "auto" on CUDA
    warm = dataclasses.replace(train_config(run), max_steps=1, early_stop_metric=None)
    train(model, (data.train.inputs, data.train.labels), warm, progress=False)
    config = dataclasses.replace(warm, max_steps=2)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        train(model, (data.train.inputs, data.train.labels), config, progress=False)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60)


def main() -> None:
    for model, d_model, seq_len in CELLS:
        run = MQARRun(model, d_model, seq_len, paper_pairs(seq_len), 1e-3, train_examples=8 * 512, test_examples=512)
        # torch's LayerNorm twice (the first timing of a process has run slow once), the fused one, compiled
        for norm, compiled in (("torch", False), ("torch", False), ("triton", False), ("triton", True)):
            label = f"{model} d{d_model} L{seq_len} norm={norm} compile={compiled}"
            try:
                ms = seconds_per_step(run, "auto", "triton", compile=compiled, norm_backend=norm) * 1e3
                print(f"{label}: {ms:.1f} ms/step", flush=True)
            except Exception as error:  # noqa: BLE001 - report and go on
                print(f"{label}: FAILED {type(error).__name__}: {str(error)[:300]}", flush=True)
        print(profile_steps(run), flush=True)


if __name__ == "__main__":
    main()
