"""Seconds per optimizer step (batch 512, the paper's settings) of the MQAR models on this GPU, by op path.

Times `rebased.train.train` itself (after a 1-step warm-up that compiles the kernels: max_steps 2, then 8;
the difference over 6 steps), so the number includes
everything a sweep pays per step: host-to-device copies, accumulation, clipping, the fused AdamW.
One process per op path (a crash in one path does not stop the others); one line per cell.

    python benchmarks/mqar_cost_gpu.py PATH [PATH ...]     # PATH: MODE-BACKEND, e.g. chunk-torch, parallel-triton
    CELLS=rebased:64:1024,based:64:2048 python benchmarks/mqar_cost_gpu.py ...   # other (model, d_model, L) cells
"""

import dataclasses
import os
import sys
import time

import torch

from rebased.feature_maps import FeatureMap
from rebased.model import LanguageModel
from rebased.ops.norm import LayerNorm
from rebased.tasks.mqar.grids import MQARRun, paper_pairs
from rebased.tasks.mqar.sweep import build_model, make_data, train_config
from rebased.train import train

CELLS = [
    ("rebased", 64, 128), ("rebased", 64, 512), ("rebased", 64, 2048), ("rebased", 128, 2048),
    ("rebased", 512, 2048), ("based", 64, 2048), ("attention", 64, 2048),
]  # fmt: skip


if "CELLS" in os.environ:
    CELLS = [(m, int(d), int(length)) for m, d, length in (c.split(":") for c in os.environ["CELLS"].split(","))]


def with_op_path(model: LanguageModel, mode: str, backend: str) -> LanguageModel:
    mixers = {
        name: dataclasses.replace(m, mode=mode, backend=backend) if hasattr(m, "backend") else m
        for name, m in model.cfg.mixers.items()
    }
    return LanguageModel(model.cfg.replace(mixers=mixers))


def with_norm_backend(model: LanguageModel, backend: str) -> LanguageModel:
    """Every LayerNorm of the model (blocks and feature maps) through this rebased.ops.norm backend."""
    for module in model.modules():
        if isinstance(module, (LayerNorm, FeatureMap)):
            module.backend = backend
    return model


def seconds_per_step(
    run: MQARRun, mode: str, backend: str, compile: bool = False, norm_backend: str | None = None
) -> float:
    data = make_data(run)
    timings = []
    for steps in (1, 2, 8):  # the first only warms up (Triton compiles, cuDNN picks algorithms)
        torch.manual_seed(0)
        model = with_op_path(build_model(run), mode, backend)
        if norm_backend is not None:
            model = with_norm_backend(model, norm_backend)
        config = dataclasses.replace(train_config(run), max_steps=steps, early_stop_metric=None, compile=compile)
        torch.cuda.synchronize()
        start = time.perf_counter()
        train(model, (data.train.inputs, data.train.labels), config, progress=False)
        torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    return (timings[2] - timings[1]) / 6


def main() -> None:
    for path in sys.argv[1:]:
        mode, backend = path.split("-")
        for model, d_model, seq_len in CELLS:
            if (mode, backend) == ("parallel", "torch") and seq_len > 512:
                continue  # the T x T scores of a 128-example micro-batch at L 2048 take tens of GB
            run = MQARRun(model, d_model, seq_len, paper_pairs(seq_len), 1e-3, train_examples=8 * 512,
                          test_examples=512)  # fmt: skip
            try:
                step = seconds_per_step(run, mode, backend)
                epoch = step * (100_000 // 512)
                mem = torch.cuda.max_memory_allocated() / 2**30
                print(f"{path:15s} {model:9s} d{d_model:<4d} L{seq_len:<5d} {step * 1e3:8.1f} ms/step "
                      f"{epoch:7.1f} s/epoch  peak {mem:5.1f} GiB", flush=True)  # fmt: skip
            except Exception as error:  # noqa: BLE001 - report and go on to the next cell
                print(f"{path:15s} {model:9s} d{d_model:<4d} L{seq_len:<5d} FAILED {type(error).__name__}: "
                      f"{str(error)[:150]}", flush=True)  # fmt: skip
            torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
