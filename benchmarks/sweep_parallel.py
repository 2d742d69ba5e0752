"""Launch-config sweep for the parallel (tiled quadratic) Triton kernels on a GPU.

    python benchmarks/sweep_parallel.py

Two workloads: the op suite's (65,536 tokens x 16 heads, q/k 16, v 64, bf16, T 1k and 4k) and an MQAR
training step's linear-attention op at L 2048 (128 sequences x 12 heads, q/k 16, v 5 and 42). Each kernel's
candidates are timed with the other two kernels at their defaults: the forward on the forward alone, dk/dv
and dq on forward+backward. GPU_CONFIGS in rebased/ops/triton/parallel.py should take the fastest rows.
"""

from __future__ import annotations

import torch
import triton.testing

import rebased.ops.triton.parallel as P
from rebased.ops import Polynomial, linear_attention
from rebased.tables import markdown_table

WORKLOADS = [  # name, batch, T, heads, D, V
    ("suite T1k", 64, 1024, 16, 16, 64), ("suite T4k", 16, 4096, 16, 16, 64),
    ("mqar d64 L2048", 128, 2048, 12, 16, 5), ("mqar d512 L2048", 128, 2048, 12, 16, 42),
]  # fmt: skip
CANDIDATES = [
    P.TileConfig(64, 64, 4, 2), P.TileConfig(64, 64, 4, 3), P.TileConfig(128, 64, 4, 2), P.TileConfig(128, 64, 8, 2),
    P.TileConfig(64, 128, 4, 2), P.TileConfig(128, 128, 8, 2), P.TileConfig(64, 32, 4, 3), P.TileConfig(32, 64, 4, 3),
]  # fmt: skip


def _ms(fn) -> float:
    try:
        return triton.testing.do_bench(fn, return_mode="median")
    except Exception as error:  # noqa: BLE001  (a config that cannot launch is a row, not a crash)
        print(f"{P.CONFIG_OVERRIDE}: {str(error)[:160]}", flush=True)
        return float("nan")


def sweep_workload(name: str, batch: int, length: int, heads: int, dim: int, value_dim: int) -> list[list]:
    kernel = Polynomial.rebased(dim)
    q, k = (torch.randn(batch, length, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(batch, length, heads, value_dim, device="cuda", dtype=torch.bfloat16)
    for x in (q, k, v):
        x.requires_grad_(True)

    def forward():
        return linear_attention(q, k, v, mode="parallel", backend="triton", kernel=kernel)[0]

    def both():
        forward().float().sum().backward()

    rows = []
    for slot, kernel_name, timed in ((0, "forward", forward), (1, "dk/dv", both), (2, "dq", both)):
        for cfg in CANDIDATES:
            configs = list(P.GPU_CONFIGS)
            configs[slot] = cfg
            P.CONFIG_OVERRIDE = tuple(configs)
            ms = _ms(timed)
            rows.append([name, kernel_name, cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, f"{ms:.3f}"])
            print(" | ".join(map(str, rows[-1])), flush=True)
    P.CONFIG_OVERRIDE = None
    return rows


def main() -> None:
    rows = [row for workload in WORKLOADS for row in sweep_workload(*workload)]
    header = ["workload", "kernel varied", "block_m", "block_n", "warps", "stages", "ms (fwd; else fwd+bwd)"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
