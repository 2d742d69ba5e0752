"""The chunk-states kernels' fp32 accuracy on a GPU by (dot precision, warps): every gradient's error against
float64 at T 100 (one chunk, no state walk) and 1000. Written when the backward's dq was wrong for fp32 inputs
on the H200 at 8 warps with tf32x3 dots (results/h200/chunk_states_fp32.log, run on the code of then: one
square block a dot, the form fp32 inputs take now).

    PYTHONPATH=. python benchmarks/chunk_states_fp32_gpu.py
"""

from __future__ import annotations

import torch

import rebased.ops.triton.chunk_states as CS
from rebased.ops import LinearAttentionState, Polynomial, linear_attention_reference
from rebased.testing import error_report

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: under TRITON_INTERPRET=1


def inputs(length: int, kernel: Polynomial, with_state: bool):
    g = torch.Generator().manual_seed(length)
    q, k = (torch.randn(2, length, 4, 16, generator=g) / 2 for _ in range(2))
    v = torch.randn(2, length, 4, 64, generator=g)
    state = None
    if with_state:
        pk, pv = torch.randn(2, 40, 4, 16, generator=g) / 2, torch.randn(2, 40, 4, 64, generator=g)
        _, state = linear_attention_reference(pk.double(), pk.double(), pv.double(), kernel=kernel,
                                              output_final_state=True)  # fmt: skip
    return q, k, v, state


def errors(length: int, with_state: bool, kernel: Polynomial) -> list[str]:
    q, k, v, state = inputs(length, kernel, with_state)
    w = torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
    ours = [x.to(DEVICE).requires_grad_() for x in (q, k, v)]
    init = None if state is None else LinearAttentionState(*(s.float().to(DEVICE) for s in state))
    o, _ = CS.chunk_states_linear_attention(*ours, kernel=kernel, initial_state=init, output_final_state=False,
                                            normalize=True, eps=1e-12, chunk_size=64)  # fmt: skip
    grads = torch.autograd.grad((o.double() * w.to(DEVICE)).sum(), ours)
    ref_in = [x.double().requires_grad_() for x in (q, k, v)]
    ro, _ = linear_attention_reference(*ref_in, kernel=kernel, initial_state=state)
    ref_grads = torch.autograd.grad((ro * w.double()).sum(), ref_in)
    out = [f"o {error_report(o.cpu(), ro)[1]:.1e}"]
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        rel = error_report(a.cpu(), b)[1]
        per_row = (a.cpu().double() - b).norm(dim=-1) / b.norm(dim=-1).mean()  # (a row's own norm can be ~0)
        bad = (per_row > 1e-3).nonzero()
        first = f" first bad t={bad[0, 1].item()}" if len(bad) else ""
        out.append(f"{name} {rel:.1e}{first}")
    return out


def main() -> None:
    print(torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch", torch.__version__, flush=True)
    kernel = Polynomial.rebased(16)
    original = CS._dot_precision
    for prec in ("tf32x3", "ieee", "tf32"):
        for warps in (8, 4):
            CS._dot_precision = lambda dtype, prec=prec: prec if dtype == torch.float32 else original(dtype)
            CS.FP32_WARPS = warps
            for length, with_state in ((100, False), (1000, True)):
                try:
                    row = errors(length, with_state, kernel)
                except Exception as error:  # noqa: BLE001
                    row = [f"failed: {str(error)[:160]}"]
                print(f"prec={prec:7s} warps={warps} T={length:5d} state={with_state!s:5s} | " + " | ".join(row),
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
