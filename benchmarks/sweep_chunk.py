"""Launch-config sweep for the Triton chunk kernels on a GPU.

    python benchmarks/sweep_chunk.py     # 65,536 tokens x 16 heads, q/k 16, v 64, bf16, ReBased

Forward configs are timed on the forward alone; backward configs on forward+backward with the default
forward. The fixed configs in rebased/ops/triton/functions.py come from the fastest rows.
"""

from __future__ import annotations

import torch
import triton.testing

import rebased.ops.triton.functions as F
from rebased.ops import Polynomial, linear_attention
from rebased.tables import markdown_table

TOKENS, HEADS, D, V = 65536, 16, 16, 64
FORWARD = (F.Config(64, 32, 8), F.Config(64, 64, 8), F.Config(32, 64, 8), F.Config(64, 32, 4))
BACKWARD = (F.Config(32, 64, 8), F.Config(32, 32, 8), F.Config(32, 32, 4), F.Config(64, 32, 8))


def _time(fn) -> float:
    try:
        return triton.testing.do_bench(fn, return_mode="median")
    except Exception as error:  # noqa: BLE001  (a config that cannot launch is a row, not a crash)
        print(f"{F.CONFIG_OVERRIDE}: {str(error)[:160]}", flush=True)
        return float("nan")


def main() -> None:
    kernel = Polynomial.rebased(D)
    default_fwd, default_bwd = F.pick_config(D, V)
    rows = []
    for length in (4096, 65536):
        batch = TOKENS // length
        q, k = (torch.randn(batch, length, HEADS, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        v = torch.randn(batch, length, HEADS, V, device="cuda", dtype=torch.bfloat16)
        for x in (q, k, v):
            x.requires_grad_(True)
        grad = torch.randn_like(v)
        run = lambda: linear_attention(q, k, v, mode="chunk", backend="triton", kernel=kernel)[0]  # noqa: B023, E731
        for cfg in FORWARD:
            F.CONFIG_OVERRIDE = (cfg, default_bwd)
            with torch.no_grad():
                rows.append([length, "forward", cfg.block_t, cfg.block_v, cfg.num_warps, _time(run)])
            print(rows[-1], flush=True)
        for cfg in BACKWARD:
            F.CONFIG_OVERRIDE = (default_fwd, cfg)
            both = _time(lambda: torch.autograd.grad(run(), (q, k, v), grad))  # noqa: B023
            rows.append([length, "forward+backward", cfg.block_t, cfg.block_v, cfg.num_warps, both])
            print(rows[-1], flush=True)
    F.CONFIG_OVERRIDE = None
    print(markdown_table(["T", "timed", "block_t", "block_v", "warps", "ms"], rows))


if __name__ == "__main__":
    main()
