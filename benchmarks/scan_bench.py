"""Mamba's selective scan on a CUDA GPU: the Triton kernels' launches (channels a program, steps a tile) against the
torch chunked form, forward + backward, at an MQAR micro-batch's shapes.

    PYTHONPATH=. python benchmarks/scan_bench.py [--cases 128:2048:128:8]

A case is sequences:steps:channels:state size (the Mamba MQAR model at d_model 64 has 128 channels and a state of
8; its micro-batches are 262,144 tokens: 128 sequences of L 2048 or 512 of L 512; x, dt, B and C in bf16 under
autocast). Each launch is timed forward alone and forward + backward (the median of triton.testing.do_bench), and
checked against the float64 torch form on the case's first 2 sequences (relative RMS of y and the worst of the
gradients). Tiles of 1 step are the walk with each step's own loads. The tables list the committed launch first
and the script ends with the fastest accurate launch per case: GPU_CHANNELS and GPU_STEPS to commit (16 steps
are left out: compiled for sm_90a the backward spills there).
"""

import argparse
import itertools

import torch
import triton.testing
from environment import versions

from rebased.ops import scan
from rebased.ops.triton import selective_scan as kernels
from rebased.tables import markdown_table
from rebased.testing import error_report

CASES = "128:2048:128:8,512:512:128:8"
LAUNCHES = list(itertools.product((16, 32), (1, 4, 8)))  # (channels, steps)
TORCH_CHUNK = 16  # MambaConfig's default chunk_size
TOLERANCE = 8e-3  # the gradients of bf16 x, dt, B, C come back in bf16: a rounding is about 2e-3 of relative RMS


def parse_cases(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(part) for part in item.split(":")) for item in text.split(",")]


def inputs(sequences: int, steps: int, channels: int, size: int):
    """x, dt, A, B, C, h0 as the Mamba mixer makes them (bf16 x, dt, B, C), and the gradient of y."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(sequences, steps, channels, device="cuda", generator=g)
    dt = torch.nn.functional.softplus(torch.randn(sequences, steps, channels, device="cuda", generator=g) - 2)
    a = -torch.rand(channels, size, device="cuda", generator=g) * 2 - 0.1
    b, c = (torch.randn(sequences, steps, size, device="cuda", generator=g) for _ in range(2))
    h0 = torch.zeros(sequences, channels, size, device="cuda")
    leaves = [t.to(torch.bfloat16) if i in (0, 1, 3, 4) else t for i, t in enumerate((x, dt, a, b, c, h0))]
    dy = torch.randn(sequences, steps, channels, device="cuda", generator=g)
    return [t.requires_grad_() for t in leaves], dy


def timings(run, leaves, dy) -> tuple[float, float]:
    """ms of the forward alone, and of forward + backward."""
    forward = triton.testing.do_bench(lambda: run(*leaves))
    both = triton.testing.do_bench(lambda: torch.autograd.grad(run(*leaves)[0], leaves, dy))
    return forward, both


def errors(run, leaves, dy) -> tuple[float, float]:
    """Relative RMS of y and the worst of the gradients against the float64 torch form, on 2 sequences."""
    small = [t.detach()[:2] if t.dim() == 3 else t.detach() for t in leaves]
    small = [t.requires_grad_() for t in small]
    y, _ = run(*small)
    grads = torch.autograd.grad(y, small, dy[:2])
    exact = [t.detach().double().requires_grad_() for t in small]
    want_y, _ = scan.selective_scan(*exact, chunk=TORCH_CHUNK, backend="torch")
    want = torch.autograd.grad(want_y, exact, dy[:2].double())
    return error_report(y, want_y)[1], max(error_report(g, w)[1] for g, w in zip(grads, want))


def with_launch(channels: int, steps: int):
    def run(*leaves):
        kernels.GPU_CHANNELS, kernels.GPU_STEPS = channels, steps
        return scan.selective_scan(*leaves, chunk=TORCH_CHUNK, backend="triton")

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=CASES, help=f"sequences:steps:channels:state,... (default {CASES})")
    args = parser.parse_args()
    print(versions(), flush=True)
    committed = (kernels.GPU_CHANNELS, kernels.GPU_STEPS)
    launches = [committed] + [launch for launch in LAUNCHES if launch != committed]
    best = {}
    for case in parse_cases(args.cases):
        leaves, dy = inputs(*case)
        rows = []
        torch_run = lambda *t: scan.selective_scan(*t, chunk=TORCH_CHUNK, backend="torch")  # noqa: E731
        try:
            forward, both = timings(torch_run, leaves, dy)
            rows.append(["torch chunked form", f"{forward:.3f}", f"{both:.3f}", "", ""])
        except torch.OutOfMemoryError:
            rows.append(["torch chunked form", "out of memory", "", "", ""])
        torch.cuda.empty_cache()
        for channels, steps in launches:
            run = with_launch(channels, steps)
            y_error, grad_error = errors(run, leaves, dy)
            forward, both = timings(run, leaves, dy)
            label = f"{channels} channels, tiles of {steps} steps"
            label += " (committed)" if (channels, steps) == committed else ""
            rows.append([label, f"{forward:.3f}", f"{both:.3f}", f"{y_error:.1e}", f"{grad_error:.1e}"])
            if max(y_error, grad_error) <= TOLERANCE and both < best.get(case, (float("inf"),))[0]:
                best[case] = (both, channels, steps)
        kernels.GPU_CHANNELS, kernels.GPU_STEPS = committed
        print(f"\n### {case[0]} sequences x {case[1]} steps x {case[2]} channels, state {case[3]}\n", flush=True)
        print(markdown_table(["launch", "forward ms", "forward + backward ms", "y rel. RMS", "grads rel. RMS"], rows))
    print("\nFastest accurate launch per case (forward + backward):")
    for case, (ms, channels, steps) in best.items():
        print(f"  {case}: GPU_CHANNELS = {channels}, GPU_STEPS = {steps} ({ms:.3f} ms)")


if __name__ == "__main__":
    main()
