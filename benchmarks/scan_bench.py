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
import walk_bench

from rebased.ops import scan
from rebased.ops.triton import selective_scan as kernels

CASES = "128:2048:128:8,512:512:128:8"
LAUNCHES = list(itertools.product((16, 32), (1, 4, 8)))  # (channels, steps)
TORCH_CHUNK = 16  # MambaConfig's default chunk_size
TOLERANCE = 8e-3  # the gradients of bf16 x, dt, B, C come back in bf16: a rounding is about 2e-3 of relative RMS


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


def op(*leaves, backend: str):
    return scan.selective_scan(*leaves, chunk=TORCH_CHUNK, backend=backend)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=CASES, help=f"sequences:steps:channels:state,... (default {CASES})")
    args = parser.parse_args()
    walk_bench.sweep(
        walk_bench.parse_cases(args.cases), inputs, op, kernels, ("GPU_CHANNELS", "GPU_STEPS"), LAUNCHES,
        describe=lambda launch: f"{launch[0]} channels, tiles of {launch[1]} steps",
        heading=lambda case: f"{case[0]} sequences x {case[1]} steps x {case[2]} channels, state {case[3]}",
        tolerance=TOLERANCE,
    )  # fmt: skip


if __name__ == "__main__":
    main()
