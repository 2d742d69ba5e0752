"""Where an MQAR training step's GPU time goes, and what the fused LayerNorm and torch.compile change (CUDA).

    PYTHONPATH=. python benchmarks/mqar_profile_gpu.py [--cells rebased:64:128,rebased:64:2048] [--no-compile]
    PYTHONPATH=. python benchmarks/mqar_profile_gpu.py --cells rebased:64:2048 --kernels-only --variant graph-triton

Per cell (model:d_model:L): ms per optimizer step (batch 512, the paper's settings, op path auto-triton, step
variant --variant of mqar_cost_gpu.VARIANTS; `mqar_cost_gpu.seconds_per_step`) with torch's LayerNorm (twice: a
process's first timing has run slow), with the fused one (rebased.ops.norm), and with the fused one under
torch.compile; then, with each LayerNorm, the CUDA kernels of one step by GPU time (torch.profiler), so a
step's cost is attributed to kernels (the linear-attention op, the loss, the norms, casts, the optimizer)
rather than guessed: first by part (kernels grouped by name, KERNEL_GROUPS), then the top kernels. The kernels
of one step are those of a 15-step run less those of a 5-step run, over 10: that leaves out the set-up and, for
the graphed variants, the eager warm-up steps and the capture, keeping the replayed steps (CUPTI records a
graph's kernels).
"""

import argparse
import dataclasses
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
from mqar_cost_gpu import (  # noqa: E402
    VARIANTS,
    apply_variant,
    parse_cells,
    seconds_per_step,
    versions,
    with_norm_backend,
    with_op_path,
)

from rebased.tasks.mqar.grids import MQARRun, paper_pairs  # noqa: E402
from rebased.tasks.mqar.sweep import build_model, make_data, train_config  # noqa: E402
from rebased.train import train  # noqa: E402

CELLS = "rebased:64:128,rebased:64:512,rebased:64:2048"
TOP_KERNELS = 30
# What a kernel does, by a piece of its name (the first group that matches wins): a step's time by part.
KERNEL_GROUPS = (
    ("linear-attention op", ("fused_chunk_", "parallel_", "chunk_state", "chunk_output", "chunk_d")),
    ("head + loss", ("rows_kernel", "cols_kernel", "softmax_grad", "cross_entropy")),
    ("LayerNorm", ("layer_norm",)),
    (
        "gathers and scatter-sums (embeddings, labelled rows)",
        ("embedding", "sum_and_scatter", "gather", "index_select", "radix", "sort"),
    ),
    ("short conv", ("conv",)),
    ("matmuls", ("gemm", "cutlass", "xmma", "cublas", "sm90_")),
    ("optimizer", ("multi_tensor", "foreach", "adam")),
    ("casts", ("copy_kernel",)),
    ("reductions", ("reduce_kernel",)),
    ("other elementwise", ("elementwise",)),
)


def kernel_group(name: str) -> str:
    lowered = name.lower()
    for group, pieces in KERNEL_GROUPS:
        if any(piece in lowered for piece in pieces):
            return group
    return "other"


def kernel_times(run: MQARRun, norm: str, variant: str, steps: int) -> dict[str, tuple[float, int]]:
    """GPU microseconds and calls per CUDA kernel name over a run of `steps` optimizer steps."""
    data = make_data(run)
    model = with_norm_backend(with_op_path(build_model(run), "auto", "triton"), norm)
    settings = apply_variant(variant)
    config = dataclasses.replace(train_config(run), max_steps=steps, early_stop_metric=None, **settings)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        train(model, (data.train.inputs, data.train.labels), config, progress=False)
        torch.cuda.synchronize()
    times: dict[str, tuple[float, int]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            total, calls = times.get(event.name, (0.0, 0))
            times[event.name] = (total + event.device_time, calls + 1)
    return times


def profile_step(run: MQARRun, norm: str, variant: str) -> str:
    """The CUDA kernels of one step (15-step run less 5-step run, over 10), by GPU time."""
    kernel_times(run, norm, variant, 1)  # Triton compiles and cuBLAS set-up outside the profiles
    short, long = (kernel_times(run, norm, variant, steps) for steps in (5, 15))
    per_step = {}
    for name, (total, calls) in long.items():
        base_total, base_calls = short.get(name, (0.0, 0))
        per_step[name] = ((total - base_total) / 10 / 1e3, (calls - base_calls) / 10)
    rows = sorted(per_step.items(), key=lambda item: -item[1][0])
    total_ms = sum(ms for ms, _ in per_step.values())
    groups: dict[str, list[float]] = {}
    for name, (ms, calls) in rows:
        group = groups.setdefault(kernel_group(name), [0.0, 0.0])
        group[0], group[1] = group[0] + ms, group[1] + calls
    lines = [f"GPU time per step {total_ms:.2f} ms in {sum(n for _, n in per_step.values()):.0f} kernels", "",
             "| part (by kernel name) | ms per step | share | kernels per step |",
             "| --- | --- | --- | --- |"]  # fmt: skip
    for group, (ms, calls) in sorted(groups.items(), key=lambda item: -item[1][0]):
        lines.append(f"| {group} | {ms:.3f} | {ms / total_ms:.1%} | {calls:.1f} |")
    lines += ["", "| kernel | ms per step | share | calls per step |", "| --- | --- | --- | --- |"]
    for name, (ms, calls) in rows[:TOP_KERNELS]:
        lines.append(f"| {name[:160]} | {ms:.3f} | {ms / total_ms:.1%} | {calls:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default=CELLS, help=f"model:d_model:L,... (default {CELLS})")
    parser.add_argument("--variant", default="fused", choices=list(VARIANTS), help="the step variant (default fused)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile timing")
    parser.add_argument("--kernels-only", action="store_true", help="only the kernels of a step, fused LayerNorm")
    parser.add_argument("--pairs", type=int, default=None, help="key-value pairs (default: the paper's L / 4)")
    args = parser.parse_args()
    print(versions(), flush=True)
    timings = [("torch", False), ("torch", False), ("triton", False)] + [("triton", True)] * (not args.no_compile)
    for model, d_model, seq_len in parse_cells(args.cells):
        pairs = args.pairs or paper_pairs(seq_len)
        run = MQARRun(model, d_model, seq_len, pairs, 1e-3, train_examples=16 * 512, test_examples=512)
        for norm, compiled in [] if args.kernels_only else timings:
            label = f"{model} d{d_model} L{seq_len} {args.variant} norm={norm} compile={compiled}"
            try:
                ms = seconds_per_step(run, "auto", "triton", compile=compiled, norm_backend=norm,
                                      variant=args.variant) * 1e3  # fmt: skip
                print(f"{label}: {ms:.1f} ms/step", flush=True)
            except Exception as error:  # noqa: BLE001 - report and go on
                print(f"{label}: FAILED {type(error).__name__}: {str(error)[:300]}", flush=True)
        for norm in ("triton",) if args.kernels_only else ("torch", "triton"):
            print(f"\n{model} d{d_model} L{seq_len} {args.variant} norm={norm}: the kernels of one step", flush=True)
            print(profile_step(run, norm, args.variant), flush=True)


if __name__ == "__main__":
    main()
