"""RWKV-4's WKV on a CUDA GPU: the Triton kernels' launches (channels a program, tokens a tile, the next tile
prefetched or not) against the torch chunked form, forward + backward, at an MQAR micro-batch's shapes.

    PYTHONPATH=. python benchmarks/wkv_bench.py [--cases 128:2048:64,128:512:64]

A case is sequences:tokens:channels (the RWKV MQAR model at d_model 64 trains micro-batches of 262,144 tokens:
128 sequences of L 2048, or 512 of L 512, its projections in bf16 under autocast and the WKV in fp32, as the
mixer casts them). Each launch is timed forward alone and forward + backward (the median of
triton.testing.do_bench), and checked against the float64 torch form on the case's first 2 sequences (relative
RMS of y and of dk, the worst of the gradients). The tables list the committed launch first and the script ends
with the fastest accurate launch per case: GPU_CHANNELS, GPU_TOKENS and GPU_PREFETCH to commit (tiles of 32
tokens are left out: compiled for sm_90a they spill, where 8 and 16 fit in registers with or without the
prefetch).
"""

import argparse
import itertools

import torch
import walk_bench

from rebased.ops import rwkv
from rebased.ops.triton import wkv as kernels

CASES = "128:2048:64,512:512:64,128:2048:128"
LAUNCHES = list(itertools.product((16, 32), (8, 16), (False, True)))  # (channels, tokens, prefetch)
TORCH_CHUNK = 32  # RWKVConfig's default chunk_size
TOLERANCE = 1e-4  # fp32 math against float64; the backward's sums run over thousands of tokens


def inputs(sequences: int, tokens: int, channels: int):
    """w, u, k, v (fp32 leaves, as the mixer passes them) and the gradient of y."""
    g = torch.Generator(device="cuda").manual_seed(0)
    w = -torch.exp(torch.linspace(-5, 3, channels, device="cuda"))
    u = torch.randn(channels, device="cuda", generator=g)
    k, v, dy = (torch.randn(sequences, tokens, channels, device="cuda", generator=g) for _ in range(3))
    return [t.requires_grad_() for t in (w, u, k, v)], dy


def op(*leaves, backend: str):
    return rwkv.wkv(*leaves, chunk=TORCH_CHUNK, backend=backend)


def describe(launch: tuple) -> str:
    channels, tokens, prefetch = launch
    return f"{channels} channels, tiles of {tokens} tokens" + (", prefetched" if prefetch else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=CASES, help=f"sequences:tokens:channels,... (default {CASES})")
    args = parser.parse_args()
    walk_bench.sweep(
        walk_bench.parse_cases(args.cases), inputs, op, kernels, ("GPU_CHANNELS", "GPU_TOKENS", "GPU_PREFETCH"),
        LAUNCHES, describe=describe, tolerance=TOLERANCE,
        heading=lambda case: f"{case[0]} sequences x {case[1]} tokens x {case[2]} channels",
    )  # fmt: skip


if __name__ == "__main__":
    main()
