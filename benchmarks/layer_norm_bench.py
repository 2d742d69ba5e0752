"""The fused LayerNorm's launches at an MQAR step's shapes (CUDA): the forward and the backward kernels timed
apart, each launch checked against torch's fp32 F.layer_norm and its gradients, beside torch's own.

    PYTHONPATH=. python benchmarks/layer_norm_bench.py [--cases 262144:64:float32,262144:192:bfloat16]

A case is rows:features:input dtype. An MQAR micro-batch at the paper's batch is 262,144 tokens. Its blocks'
LayerNorms take the fp32 residual stream over d_model features. The feature map's take the bf16 projections
of q and k over 12 x 16 = 192 features. Every output is bf16, as under autocast, and so is the incoming
gradient. A launch is a NormLaunch of rebased/ops/triton/layer_norm.py: (tile bytes, warps) for the forward,
and also (programs a SM, tile sums) for the backward. Each is timed as it runs in a training step: the
kernel and its allocations (and for the backward the sum of its partials), not autograd's bookkeeping (the
median of triton.testing.do_bench). The tables list every launch, the committed one first, and the script ends
with the fastest accurate FORWARD_LAUNCH and BACKWARD_LAUNCH per case, then the one launch of each kernel with
the lowest time summed over the cases (accurate in all): the one to commit.
"""

import argparse
import itertools

import torch
import torch.nn.functional as F
import triton.testing
from environment import versions

from rebased.ops.triton import layer_norm as fused
from rebased.testing import error_report

CASES = "262144:64:float32,262144:192:bfloat16,262144:128:float32,262144:384:bfloat16"
FORWARD_LAUNCHES = [
    fused.NormLaunch(tile, warps) for tile, warps in itertools.product((4096, 8192, 16384, 32768), (4, 8))
]
BACKWARD_LAUNCHES = [
    fused.NormLaunch(tile, warps, programs, tile_sums)
    for tile, warps, programs, tile_sums in itertools.product((4096, 8192, 16384), (4, 8), (8, 16), (False, True))
]
DEVICE = "cuda"
EPS = 1e-5
TOLERANCE = 2e-2  # bf16 outputs and gradients against torch's fp32 math: a few bf16 ulps of relative RMS


def parse_cases(text: str) -> list[tuple[int, int, torch.dtype]]:
    cases = []
    for item in text.split(","):
        rows, features, dtype = item.split(":")
        cases.append((int(rows), int(features), getattr(torch, dtype)))
    return cases


def inputs(rows: int, features: int, dtype: torch.dtype):
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    x = (torch.randn(rows, features, device=DEVICE, generator=generator) * 2 + 0.5).to(dtype)
    weight = 1 + 0.1 * torch.randn(features, device=DEVICE, generator=generator)
    bias = 0.1 * torch.randn(features, device=DEVICE, generator=generator)
    dy = torch.randn(rows, features, device=DEVICE, generator=generator).to(torch.bfloat16)
    return x, weight, bias, dy


def torch_reference(x, weight, bias, dy) -> tuple[float, float, list[torch.Tensor]]:
    """torch's F.layer_norm under autocast: (forward ms, backward ms through autograd, [y, dx, dgamma, dbeta] of
    the fp32 math)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]

    def run():
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            return F.layer_norm(leaves[0], leaves[0].shape[-1:], leaves[1], leaves[2], EPS)

    forward_ms = triton.testing.do_bench(run, return_mode="median")
    y = run()
    backward_ms = triton.testing.do_bench(lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True),
                                          return_mode="median")  # fmt: skip
    exact = [t.detach().float().requires_grad_(True) for t in (x, weight, bias)]
    y32 = F.layer_norm(exact[0], exact[0].shape[-1:], exact[1], exact[2], EPS)
    return forward_ms, backward_ms, [y32, *torch.autograd.grad(y32, exact, dy.float())]


def committed_first(committed: fused.NormLaunch, candidates: list[fused.NormLaunch]) -> list[fused.NormLaunch]:
    return [committed] + [launch for launch in candidates if launch != committed]


def sweep_forward(x, weight, bias, want_y) -> list[tuple]:
    """(launch, ms, error of y) per forward launch."""
    rows = []
    for launch in committed_first(fused.FORWARD_LAUNCH, FORWARD_LAUNCHES):
        run = lambda launch=launch: fused.launch_forward(x, weight, bias, EPS, torch.bfloat16, launch)  # noqa: E731
        ms = triton.testing.do_bench(run, return_mode="median")
        rows.append((launch, ms, error_report(run()[0], want_y)[1]))
    return rows


def sweep_backward(x, weight, bias, dy, want_grads) -> list[tuple]:
    """(launch, ms, worst error of dx, dgamma, dbeta) per backward launch, from the committed forward's stats."""
    _, mean, rstd = fused.launch_forward(x, weight, bias, EPS, torch.bfloat16, fused.FORWARD_LAUNCH)
    rows = []
    for launch in committed_first(fused.BACKWARD_LAUNCH, BACKWARD_LAUNCHES):
        run = lambda launch=launch: fused.launch_backward(x, weight, dy, mean, rstd, launch)  # noqa: E731
        ms = triton.testing.do_bench(run, return_mode="median")
        rows.append((launch, ms, max(error_report(g, w)[1] for g, w in zip(run(), want_grads))))
    return rows


def described(launch: fused.NormLaunch, kind: str) -> str:
    text = f"{launch.tile_bytes} B tiles, {launch.warps} warps"
    if kind == "backward":
        text += f", {launch.programs_per_sm} programs/SM" + (", tile sums" if launch.tile_sums else "")
    return text


def report(case: str, kind: str, rows: list[tuple], best: dict, totals: dict) -> None:
    """Print the rows; keep the fastest accurate launch per (case, kind) in best, and each launch's ms summed over
    the cases in totals[kind] (None once it is inaccurate in any case)."""
    for launch, ms, error in rows:
        mark = "" if error <= TOLERANCE else f" ABOVE {TOLERANCE:g}"
        print(f"| {case} | {kind} | {described(launch, kind)} | {ms:.4f} | {error:.1e}{mark} |", flush=True)
        if error <= TOLERANCE and ms < best.get((case, kind), (None, float("inf")))[1]:
            best[(case, kind)] = (launch, ms)
        total = totals.setdefault(kind, {}).get(launch, 0.0)
        totals[kind][launch] = None if total is None or error > TOLERANCE else total + ms


def print_fastest_overall(totals: dict) -> None:
    """The one launch a kernel would commit: the lowest ms summed over every case, accurate in all of them."""
    print("\nfastest accurate launch over all cases (ms summed; the committed launch's sum beside it):")
    for kind, sums in totals.items():
        accurate = {launch: total for launch, total in sums.items() if total is not None}
        if not accurate:
            print(f"  {kind}: no launch accurate in every case")
            continue
        launch = min(accurate, key=accurate.get)
        committed = fused.FORWARD_LAUNCH if kind == "forward" else fused.BACKWARD_LAUNCH
        mine = sums.get(committed)
        print(f"  {kind}: {launch}, {accurate[launch]:.4f} ms (committed: "
              f"{'inaccurate' if mine is None else f'{mine:.4f} ms'})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=CASES, help=f"rows:features:dtype,... (default {CASES})")
    args = parser.parse_args()
    print(versions(DEVICE))
    print("\n| rows x features, input | kernel | launch | ms | worst rel. RMS |")
    print("| --- | --- | --- | --- | --- |")
    best, totals = {}, {}
    for rows, features, dtype in parse_cases(args.cases):
        case = f"{rows:,} x {features}, {str(dtype).removeprefix('torch.')}"
        x, weight, bias, dy = inputs(rows, features, dtype)
        torch_fwd, torch_bwd, (want_y, *want_grads) = torch_reference(x, weight, bias, dy)
        print(f"| {case} | forward | torch F.layer_norm | {torch_fwd:.4f} | |", flush=True)
        print(f"| {case} | backward | torch, through autograd | {torch_bwd:.4f} | |", flush=True)
        report(case, "forward", sweep_forward(x, weight, bias, want_y), best, totals)
        report(case, "backward", sweep_backward(x, weight, bias, dy, want_grads), best, totals)
        del x, weight, bias, dy, want_y, want_grads
        torch.cuda.empty_cache()
    print("\nfastest accurate launch per case (committed first on ties):")
    for (case, kind), (launch, ms) in best.items():
        print(f"  {case}, {kind}: {launch}, {ms:.4f} ms")
    print_fastest_overall(totals)


if __name__ == "__main__":
    main()
