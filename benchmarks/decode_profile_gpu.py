"""What bounds a static decode step on a CUDA GPU: its kernels, their summed GPU time, and the replayed graph's
wall time per step, for the pile_150m models (random weights, bf16).

    PYTHONPATH=. python benchmarks/decode_profile_gpu.py --out DIR        # writes DIR/decode_profile.md
    PYTHONPATH=. python benchmarks/decode_profile_gpu.py --cases rebased:64:1024,attention:64:16384

Per case: the step as the static decoder replays it (one CUDA graph), timed over --steps steps; the same steps
under torch.profiler (CUPTI records the graph's kernels), which gives the kernels per step and their summed GPU
time; and the bytes a step must read at least (weights, plus the fixed-size states or the attention cache up to
the context), over the GPU's memory bandwidth. If the wall time is close to the kernels' sum and far above the
bytes' floor, the step is bound by how many kernels it runs and how little each one does, not by memory.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from rebased.decode import StaticDecoder
from rebased.model import LanguageModel
from rebased.tasks.lm.train import lm_config

H200_BANDWIDTH = 4.8e12  # bytes/s, the H200's HBM3e peak


def read_floor_bytes(model: LanguageModel, batch: int, context: int) -> int:
    """What a step must read at least: the weights, and the generation state after `context` tokens (the
    fixed-size states; attention's cache up to the context)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights + model.state_size(context, batch).bytes


@torch.inference_mode()
def profile_case(kind: str, batch: int, context: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = LanguageModel(lm_config("pile_150m", kind=kind)).cuda().to(torch.bfloat16)
    prompt = torch.randint(model.cfg.vocab_size, (batch, context), device="cuda")
    decoder = StaticDecoder(model, batch, context + 2 * steps + 8)
    decoder.prefill(prompt)
    ids = prompt[:, -1]
    for _ in range(4):
        ids = decoder.step(ids).argmax(-1)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        ids = decoder.step(ids).argmax(-1)
    torch.cuda.synchronize()
    wall_ms = 1e3 * (time.perf_counter() - start) / steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            ids = decoder.step(ids).argmax(-1)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_ms = sum(e.device_time for e in kernels) / 1e3 / steps
    floor = read_floor_bytes(model, batch, context)
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time / 1e3 / steps
    counts: dict[str, int] = {}
    for e in kernels:
        counts[e.name] = counts.get(e.name, 0) + 1
    every = [(name, ms, counts[name] / steps) for name, ms in sorted(by_name.items(), key=lambda item: -item[1])]
    top = [(name, ms) for name, ms, _ in every[:5]]
    return dict(
        kind=kind,
        batch=batch,
        context=context,
        wall_ms=wall_ms,
        kernels=len(kernels) / steps,
        kernel_ms=kernel_ms,
        floor_gb=floor / 1e9,
        floor_ms=1e3 * floor / H200_BANDWIDTH,
        top=top,
        every=every,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="rebased:1:1024,rebased:64:1024,based:64:1024,attention:64:1024,"
                                           "attention:64:16384")  # fmt: skip
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--all-kernels", action="store_true", help="every kernel of a step, per case, by GPU time")
    args = parser.parse_args()
    lines = [
        "| model | batch | context | step ms (graph) | kernels per step | kernels' GPU ms | bytes read at least | "
        "floor ms at 4.8 TB/s | step / floor |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    tops = []
    for case in args.cases.split(","):
        kind, batch, context = case.split(":")
        row = profile_case(kind, int(batch), int(context), args.steps)
        lines.append(f"| {kind} | {batch} | {context} | {row['wall_ms']:.3f} | {row['kernels']:.0f} | "
                     f"{row['kernel_ms']:.3f} | {row['floor_gb']:.2f} GB | {row['floor_ms']:.3f} | "
                     f"{row['wall_ms'] / row['floor_ms']:.1f} |")  # fmt: skip
        tops.append(f"- {case}: " + "; ".join(f"{name[:70]} {ms:.3f} ms" for name, ms in row["top"]))
        if args.all_kernels:
            tops += ["", f"  | {case}: kernel | calls per step | GPU ms per step |", "  | --- | --- | --- |"]
            tops += [f"  | {name[:100]} | {calls:.1f} | {ms:.4f} |" for name, ms, calls in row["every"]] + [""]
        print(lines[-1], flush=True)
        torch.cuda.empty_cache()
    text = "\n".join([f"{torch.cuda.get_device_name()}; torch {torch.__version__}", "", *lines, "",
                      "Largest kernels per step (GPU ms):", "", *tops, ""])  # fmt: skip
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "decode_profile.md").write_text(text)


if __name__ == "__main__":
    main()
