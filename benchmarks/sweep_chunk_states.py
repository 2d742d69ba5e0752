"""Chunk length and warps of the chunk-states kernels on a GPU, beside the parallel kernels.

    PYTHONPATH=. python benchmarks/sweep_chunk_states.py [--variants 256:float32,512:float32] [--lengths 4096]
                                                         [--no-others]

The op suite's workload (65,536 tokens x 16 heads, q/k 16, v 64, bf16, ReBased) at T 1k to 64k: forward and
forward+backward median ms (triton.testing.do_bench) and peak memory above the inputs, one row per
(implementation, chunk length, state storage, T). CHUNK and STATE_DTYPE in rebased/ops/triton/chunk_states.py
should take the fastest that passes the GPU tests (bf16 storage: run them with it too).
"""

from __future__ import annotations

import argparse

import torch
import triton.testing

import rebased.ops.triton.chunk_states as CS
from rebased.ops import Polynomial, linear_attention
from rebased.tables import markdown_table

LENGTHS = (1024, 4096, 16384, 65536)
VARIANTS = (
    (64, torch.float32),
    (128, torch.float32),
    (256, torch.float32),
    (128, torch.bfloat16),
    (256, torch.bfloat16),
)  # (chunk length, state storage)


def measure(fn, q, k, v) -> tuple[float, float, float]:
    def forward():
        return fn(q, k, v)

    def both():
        forward().float().sum().backward()

    try:
        fwd = triton.testing.do_bench(forward, return_mode="median")
        bwd = triton.testing.do_bench(both, return_mode="median")
    except Exception as error:  # noqa: BLE001  (a config that cannot launch is a row, not a crash)
        print(f"  failed: {str(error)[:200]}", flush=True)
        return float("nan"), float("nan"), float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    both()
    torch.cuda.synchronize()
    return fwd, bwd, (torch.cuda.max_memory_allocated() - base) / 2**20


def implementation(name: str, variant: tuple | None, kernel: Polynomial):
    """fn(q, k, v) -> o for one row of the sweep."""
    if variant is not None:
        CS.CHUNK, CS.STATE_DTYPE = variant
        options = dict(initial_state=None, output_final_state=False, normalize=True, eps=1e-12, chunk_size=64)
        return lambda q, k, v: CS.chunk_states_linear_attention(q, k, v, kernel=kernel, **options)[0]
    return lambda q, k, v: linear_attention(q, k, v, mode="parallel", backend="triton", kernel=kernel)[0]


def parse_variant(text: str) -> tuple[int, torch.dtype]:
    chunk, dtype = text.split(":")
    return int(chunk), getattr(torch, dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=lambda s: [parse_variant(v) for v in s.split(",")], default=VARIANTS)
    parser.add_argument("--lengths", type=lambda s: [int(t) for t in s.split(",")], default=LENGTHS)
    parser.add_argument("--no-others", action="store_true", help="only chunk-states, not the parallel kernels")
    args = parser.parse_args()
    kernel = Polynomial.rebased(16)
    candidates = [(f"chunk_states C{c} {str(d)[6:]}", (c, d)) for c, d in args.variants]
    if not args.no_others:
        candidates.append(("parallel", None))
    rows = []
    for length in args.lengths:
        batch = 65536 // length
        q, k = (torch.randn(batch, length, 16, 16, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        v = torch.randn(batch, length, 16, 64, device="cuda", dtype=torch.bfloat16)
        for x in (q, k, v):
            x.requires_grad_(True)
        for name, variant in candidates:
            if name == "parallel" and length > 16384:
                continue
            fwd, bwd, mib = measure(implementation(name, variant, kernel), q, k, v)
            rows.append([name, length, f"{fwd:.3f}", f"{bwd:.3f}", f"{mib:.0f}"])
            print(" | ".join(map(str, rows[-1])), flush=True)
    print(markdown_table(["implementation", "T", "fwd ms", "fwd+bwd ms", "fwd+bwd MiB"], rows))


if __name__ == "__main__":
    main()
