"""Launch-config sweep for the Triton chunk kernels on a GPU: forward and forward+backward time per config.

    python benchmarks/sweep_chunk.py            # 65,536 tokens x 16 heads, q/k 16, v 64, bf16, ReBased

Prints one table; the fixed configs in rebased/ops/triton/functions.py come from its fastest rows.
"""

from __future__ import annotations

import torch
import triton.testing

import rebased.ops.triton.functions as F
from rebased.ops import Polynomial, linear_attention
from rebased.tables import markdown_table

TOKENS, HEADS, D, V = 65536, 16, 16, 64


def main() -> None:
    kernel = Polynomial.rebased(D)
    rows = []
    for length in (4096, 65536):
        batch = TOKENS // length
        q, k = (torch.randn(batch, length, HEADS, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        v = torch.randn(batch, length, HEADS, V, device="cuda", dtype=torch.bfloat16)
        for x in (q, k, v):
            x.requires_grad_(True)
        grad = torch.randn_like(v)
        for block_t, block_v, warps in ((64, 64, 4), (64, 32, 4), (64, 64, 8), (32, 64, 4)):
            F.CONFIG_OVERRIDE = F.Config(block_t, block_v, warps)
            run = lambda: linear_attention(q, k, v, mode="chunk", backend="triton", kernel=kernel)[0]  # noqa: B023, E731
            try:
                with torch.no_grad():
                    fwd = triton.testing.do_bench(run, return_mode="median")
                both = triton.testing.do_bench(
                    lambda: torch.autograd.grad(run(), (q, k, v), grad),  # noqa: B023
                    return_mode="median",
                )
            except Exception as error:  # noqa: BLE001  (a config that does not compile is a row, not a crash)
                fwd = both = float("nan")
                print(f"T={length} {F.CONFIG_OVERRIDE}: {str(error)[:100]}")
            rows.append([length, block_t, block_v, warps, fwd, both])
            print(rows[-1], flush=True)
    F.CONFIG_OVERRIDE = None
    print(markdown_table(["T", "block_t", "block_v", "warps", "fwd ms", "fwd+bwd ms"], rows))


if __name__ == "__main__":
    main()
