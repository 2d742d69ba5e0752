"""The fused LayerNorm against torch's, alone, at the MQAR models' shapes (one device call, about a minute).

    python benchmarks/layer_norm_gpu.py

A training step's wall time on the lent machine varies by 20% between identical runs (the host is the bound
at short L: benchmarks/results/h200_mqar/README.md), too much to see a LayerNorm's share; this times the op
itself, forward and forward+backward, as the model calls it: bf16 input under bf16 autocast, weight and
bias fp32 parameters. Rows: an MQAR micro-batch of 32 x 2048 tokens (the joint feature-map norm over
12 heads x 16 = 192 features; the block norms over d_model 64 and 512) and of 512 x 128 tokens.
"""

import torch
import triton.testing

from rebased.ops.norm import layer_norm
from rebased.tables import markdown_table

SHAPES = [(32 * 2048, 192), (32 * 2048, 64), (32 * 2048, 512), (512 * 128, 192)]  # rows, features


def time_ms(backend: str, rows: int, features: int, backward: bool) -> float:
    x = torch.randn(rows, features, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
    w = torch.ones(features, device="cuda", requires_grad=backward)
    b = torch.zeros(features, device="cuda", requires_grad=backward)

    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer_norm(x, w, b, 1e-5, backend=backend)  # "torch": F.layer_norm
        if backward:
            y.backward(torch.ones_like(y))

    return triton.testing.do_bench(run, return_mode="median")


def main() -> None:
    rows = []
    for n_rows, features in SHAPES:
        for backward in (False, True):
            torch_ms, fused_ms = (time_ms(b, n_rows, features, backward) for b in ("torch", "triton"))
            rows.append([n_rows, features, "fwd+bwd" if backward else "fwd", f"{torch_ms:.3f}", f"{fused_ms:.3f}",
                         f"{torch_ms / fused_ms:.2f}"])  # fmt: skip
            print(" | ".join(map(str, rows[-1])), flush=True)
    print(markdown_table(["rows", "features", "pass", "torch ms", "fused ms", "torch / fused"], rows))


if __name__ == "__main__":
    main()
