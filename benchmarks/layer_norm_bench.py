"""The fused LayerNorm's launches at an MQAR step's shapes (CUDA): forward and backward time per launch set,
beside torch's F.layer_norm, with each launch set's gradients checked against torch's.

    PYTHONPATH=. python benchmarks/layer_norm_bench.py [--cases 262144:64:float32,262144:192:bfloat16]

A case is rows:features:input dtype. An MQAR micro-batch at the paper's batch is 262,144 tokens. Its blocks'
LayerNorms take the fp32 residual stream over d_model features. The feature map's take the bf16 projections
of q and k over 12 x 16 = 192 features. Every output is bf16, as under autocast, and so is the incoming
gradient. A launch set is (TILE_BYTES, NUM_WARPS, BACKWARD_PROGRAMS_PER_SM) of
rebased/ops/triton/layer_norm.py. The table lists every set, the committed one first, and ends with the fastest
set per case. Time: the median of triton.testing.do_bench, forward alone and backward alone (dx, dgamma and
dbeta from a saved forward).
"""

import argparse
import itertools

import torch
import torch.nn.functional as F
import triton
import triton.testing
from environment import versions

from rebased.ops.triton import layer_norm as fused
from rebased.testing import error_report

CASES = "262144:64:float32,262144:192:bfloat16,262144:128:float32,262144:384:bfloat16"
TILES = (4096, 8192, 16384, 32768, 65536)  # bytes of input a tile
WARPS = (4, 8)
PROGRAMS_PER_SM = (4, 8, 16, 32)
DEVICE = "cuda"
TOLERANCE = 2e-2  # bf16 outputs and gradients against torch's fp32 math: a few bf16 ulps of relative RMS


def parse_cases(text: str) -> list[tuple[int, int, torch.dtype]]:
    cases = []
    for item in text.split(","):
        rows, features, dtype = item.split(":")
        cases.append((int(rows), int(features), getattr(torch, dtype)))
    return cases


def inputs(rows: int, features: int, dtype: torch.dtype):
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    x = (torch.randn(rows, features, device=DEVICE, generator=generator) * 2 + 0.5).to(dtype).requires_grad_(True)
    weight = (1 + 0.1 * torch.randn(features, device=DEVICE, generator=generator)).requires_grad_(True)
    bias = (0.1 * torch.randn(features, device=DEVICE, generator=generator)).requires_grad_(True)
    dy = torch.randn(rows, features, device=DEVICE, generator=generator).to(torch.bfloat16)
    return x, weight, bias, dy


def forward(x, weight, bias, use_torch: bool):
    if use_torch:
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            return F.layer_norm(x, x.shape[-1:], weight, bias, 1e-5)
    return fused.fused_layer_norm(x, weight, bias, 1e-5, torch.bfloat16)


def time_one(x, weight, bias, dy, use_torch: bool) -> tuple[float, float, list[torch.Tensor]]:
    """(forward ms, backward ms, [y, dx, dgamma, dbeta])."""
    forward_ms = triton.testing.do_bench(lambda: forward(x, weight, bias, use_torch), return_mode="median")
    y = forward(x, weight, bias, use_torch)
    grads = torch.autograd.grad(y, (x, weight, bias), dy.to(y.dtype), retain_graph=True)
    backward_ms = triton.testing.do_bench(
        lambda: torch.autograd.grad(y, (x, weight, bias), dy.to(y.dtype), retain_graph=True), return_mode="median"
    )
    return forward_ms, backward_ms, [y, *grads]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=CASES, help=f"rows:features:dtype,... (default {CASES})")
    args = parser.parse_args()
    print(versions(DEVICE))
    committed = (fused.TILE_BYTES, fused.NUM_WARPS, fused.BACKWARD_PROGRAMS_PER_SM)
    launch_sets = [committed] + [s for s in itertools.product(TILES, WARPS, PROGRAMS_PER_SM) if s != committed]
    print("\n| rows x features, input | launch (tile, warps, programs/SM) | fwd ms | bwd ms | worst rel. RMS |")
    print("| --- | --- | --- | --- | --- |")
    best = {}
    for rows, features, dtype in parse_cases(args.cases):
        case = f"{rows:,} x {features}, {str(dtype).removeprefix('torch.')}"
        x, weight, bias, dy = inputs(rows, features, dtype)
        torch_fwd, torch_bwd, want = time_one(x, weight, bias, dy, use_torch=True)
        print(f"| {case} | torch F.layer_norm | {torch_fwd:.4f} | {torch_bwd:.4f} | |", flush=True)
        for launch in launch_sets:
            fused.TILE_BYTES, fused.NUM_WARPS, fused.BACKWARD_PROGRAMS_PER_SM = launch
            fwd, bwd, got = time_one(x, weight, bias, dy, use_torch=False)
            error = max(error_report(g, w)[1] for g, w in zip(got, want))
            mark = "" if error <= TOLERANCE else f" ABOVE {TOLERANCE:g}"
            print(f"| {case} | {launch} | {fwd:.4f} | {bwd:.4f} | {error:.1e}{mark} |", flush=True)
            if error <= TOLERANCE and bwd + fwd < best.get(case, (float("inf"),))[0]:
                best[case] = (fwd + bwd, launch, fwd, bwd)
        fused.TILE_BYTES, fused.NUM_WARPS, fused.BACKWARD_PROGRAMS_PER_SM = committed
        del x, weight, bias, dy, want
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print("\nfastest (forward + backward) per case:")
    for case, (_, launch, fwd, bwd) in best.items():
        print(f"  {case}: {launch}, {fwd:.4f} + {bwd:.4f} ms")


if __name__ == "__main__":
    main()
