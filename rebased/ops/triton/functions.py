"""Python side of the Triton kernels: launch configs, the autograd Function, and the decode step.

The kernels take the polynomial as numbers (c0, c1, c2, scale) plus which terms exist, so ReBased, Based
and the square ablations are one kernel compiled per term pattern, not a copy per kernel. q, k arriving
already feature-mapped (kernel=None) are the linear kernel on dimension F: the same state layout.

Shape letters: B batch, T time, H heads, D q/k dim, F feature dim, V value dim, NV value blocks.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from rebased.ops.common import LinearAttentionState, feature_dim
from rebased.ops.kernels import Polynomial
from rebased.ops.triton.chunk import chunk_bwd_kernel, chunk_fwd_kernel
from rebased.ops.triton.step_kernel import step_kernel

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Config:
    block_t: int  # chunk length C
    block_v: int  # value columns per program
    num_warps: int


# Set by benchmarks/ to sweep configs; None picks by shape.
CONFIG_OVERRIDE: Config | None = None


def pick_config(head_dim: int, value_dim: int) -> Config:
    """Fixed configs (the interpreter cannot autotune): the quadratic state [BD^2, BV] fp32 lives in
    registers, so BV shrinks as D grows to keep it near 16k floats a program."""
    if CONFIG_OVERRIDE is not None:
        return CONFIG_OVERRIDE
    bd = max(16, triton.next_power_of_2(head_dim))
    bv_max = max(16, triton.next_power_of_2(value_dim))
    if interpreting():
        return Config(block_t=32, block_v=min(32, bv_max), num_warps=4)
    if bd <= 16:
        return Config(block_t=64, block_v=min(64, bv_max), num_warps=8)
    return Config(block_t=32, block_v=16, num_warps=8)


@dataclass(frozen=True)
class _Poly:
    """The kernel arguments for one polynomial (feature coefficients a_i with a_i^2 = c_i scale^i)."""

    c0: float
    c1: float
    c2: float
    scale: float

    @classmethod
    def of(cls, kernel: Polynomial | None) -> _Poly:
        kernel = Polynomial.linear() if kernel is None else kernel
        return cls(kernel.c0, kernel.c1, kernel.c2, kernel.scale)

    def args(self) -> tuple[float, ...]:
        a0, a1, a2 = math.sqrt(self.c0), math.sqrt(self.c1 * self.scale), math.sqrt(self.c2) * self.scale
        return (self.scale, self.c0, self.c1, self.c2, a0, a1, a2)

    def flags(self) -> dict[str, bool]:
        return dict(HAS0=self.c0 > 0, HAS1=self.c1 > 0, HAS2=self.c2 > 0)

    @property
    def clamp(self) -> bool:
        return Polynomial(self.c0, self.c1, self.c2, self.scale).non_negative


def _blocks(head_dim: int, poly: _Poly) -> tuple[int, int]:
    bd = max(16, triton.next_power_of_2(head_dim))
    return bd, (bd * bd if poly.c2 > 0 else 16)  # BD2 is unused without a quadratic term: keep it tiny


class ChunkFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kv0, ksum0, poly: _Poly, output_final_state: bool, normalize: bool, eps: float):
        batch, length, heads, head_dim = q.shape
        value_dim, feat = v.shape[-1], feature_dim(head_dim, Polynomial(poly.c0, poly.c1, poly.c2, poly.scale))
        cfg = pick_config(head_dim, value_dim)
        bd, bd2 = _blocks(head_dim, poly)
        num_v = triton.cdiv(value_dim, cfg.block_v)
        o = torch.empty_like(v)
        den = torch.empty(batch, length, heads, device=q.device, dtype=torch.float32)
        final = [None, None]
        if output_final_state:
            final = [
                q.new_empty(batch, heads, feat, value_dim, dtype=torch.float32),
                q.new_empty(batch, heads, feat, dtype=torch.float32),
            ]
        use_init = kv0 is not None
        chunk_fwd_kernel[(num_v, batch * heads)](
            q, k, v, o, den, kv0 if use_init else o, ksum0 if use_init else o,
            final[0] if output_final_state else o, final[1] if output_final_state else o,
            length, heads, head_dim, value_dim, feat, *poly.args(), eps,
            BT=cfg.block_t, BD=bd, BD2=bd2, BV=cfg.block_v, **poly.flags(),
            USE_INIT=use_init, STORE_FINAL=output_final_state, NORMALIZE=normalize, CLAMP=poly.clamp,
            PREC=_precision(q.dtype), num_warps=cfg.num_warps,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, o, den, kv0, ksum0)
        ctx.poly, ctx.normalize, ctx.eps, ctx.feat = poly, normalize, eps, feat
        ctx.mark_non_differentiable(den)
        return o, final[0], final[1]

    @staticmethod
    def backward(ctx, do, d_kv, d_ksum):
        q, k, v, o, den, kv0, ksum0 = ctx.saved_tensors
        poly, feat = ctx.poly, ctx.feat
        batch, length, heads, head_dim = q.shape
        value_dim = v.shape[-1]
        cfg = pick_config(head_dim, value_dim)
        bd, bd2 = _blocks(head_dim, poly)
        num_v = triton.cdiv(value_dim, cfg.block_v)
        do = do.contiguous()
        # the normaliser's gradient, one number a token: -(do . o) / (den + eps), in fp32
        dd = -(do.float() * o.float()).sum(-1) / (den + ctx.eps) if ctx.normalize else den
        dq = q.new_empty(num_v, batch, length, heads, head_dim, dtype=torch.float32)
        dk = torch.empty_like(dq)
        dv = torch.empty_like(v)
        use_init, use_dfinal = kv0 is not None, d_kv is not None or d_ksum is not None
        if use_dfinal:
            d_kv = torch.zeros(batch, heads, feat, value_dim, device=q.device) if d_kv is None else d_kv
            d_ksum = torch.zeros(batch, heads, feat, device=q.device) if d_ksum is None else d_ksum
            d_kv, d_ksum = d_kv.float().contiguous(), d_ksum.float().contiguous()
        d_kv0 = torch.empty_like(kv0) if use_init else None
        d_ksum0 = torch.empty_like(ksum0) if use_init else None
        chunk_bwd_kernel[(num_v, batch * heads)](
            q, k, v, do, den, dd, kv0 if use_init else dq, ksum0 if use_init else dq,
            d_kv if use_dfinal else dq, d_ksum if use_dfinal else dq, dq, dk, dv,
            d_kv0 if use_init else dq, d_ksum0 if use_init else dq,
            length, heads, head_dim, value_dim, feat, *poly.args(), ctx.eps,
            BT=cfg.block_t, BD=bd, BD2=bd2, BV=cfg.block_v, **poly.flags(),
            USE_INIT=use_init, USE_DFINAL=use_dfinal, NORMALIZE=ctx.normalize,
            PREC=_precision(q.dtype), num_warps=cfg.num_warps,
        )  # fmt: skip
        dq = dq.sum(0).to(q.dtype)
        dk = dk.sum(0).to(k.dtype)
        return dq, dk, dv, d_kv0, d_ksum0, None, None, None, None


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs get fp32 dots (the contract is fp32 accuracy); 16-bit inputs let fp32 dots use tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _check(q: Tensor, kernel: Polynomial | None, what: str) -> None:
    if q.dtype not in SUPPORTED_DTYPES:
        raise NotImplementedError(f"{what} supports float32, bfloat16 and float16, got {q.dtype}")
    if not (q.is_cuda or interpreting()):
        raise NotImplementedError(f"{what} needs CUDA tensors (or TRITON_INTERPRET=1), got device {q.device}")
    if kernel is None and q.shape[-1] > 128:
        raise NotImplementedError(f"{what} takes feature-mapped q, k up to dim 128, got {q.shape[-1]}")
    if kernel is not None and q.shape[-1] > 32:
        raise NotImplementedError(f"{what} supports polynomial kernels with q/k dim <= 32, got {q.shape[-1]}")


def chunk_linear_attention(
    q: Tensor,  # [B, T, H, D]
    k: Tensor,  # [B, T, H, D]
    v: Tensor,  # [B, T, H, V]
    *,
    kernel: Polynomial | None,
    initial_state: LinearAttentionState | None,
    output_final_state: bool,
    normalize: bool,
    eps: float,
    chunk_size: int,
) -> tuple[Tensor, LinearAttentionState | None]:
    """The ("chunk", "triton") pair. chunk_size is the torch mode's knob: the kernel picks its own block."""
    del chunk_size
    _check(q, kernel, "(mode='chunk', backend='triton')")
    if not (q.dtype == k.dtype == v.dtype):
        raise NotImplementedError(f"triton chunk needs one dtype for q, k, v, got {q.dtype}, {k.dtype}, {v.dtype}")
    kv0 = ksum0 = None
    if initial_state is not None:
        kv0, ksum0 = (x.float().contiguous() for x in initial_state)
    o, kv, ksum = ChunkFunction.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), kv0, ksum0, _Poly.of(kernel), output_final_state, normalize, eps
    )
    return o, (LinearAttentionState(kv, ksum) if output_final_state else None)


@torch.no_grad()
def step_(
    q: Tensor,  # [B, H, D]
    k: Tensor,  # [B, H, D]
    v: Tensor,  # [B, H, V]
    state: LinearAttentionState,  # fp32, contiguous; updated in place
    *,
    kernel: Polynomial | None = None,
    normalize: bool = True,
    eps: float = 1e-12,
) -> Tensor:
    """One decoding step (inference only, no autograd): adds phi(k) v^T to the state in place, returns o."""
    _check(q, kernel, "triton step")
    kv, k_sum = state
    if kv.dtype != torch.float32 or k_sum.dtype != torch.float32 or not (kv.is_contiguous() and k_sum.is_contiguous()):
        raise ValueError("triton step updates the state in place: it must be contiguous float32")
    batch, heads, head_dim = q.shape
    value_dim = v.shape[-1]
    poly = _Poly.of(kernel)
    feat = kv.shape[2]
    bd, bd2 = _blocks(head_dim, poly)
    o = torch.empty_like(v)
    block_v = min(max(16, triton.next_power_of_2(value_dim)), max(16, 8192 // bd2))  # ~64 floats a thread
    step_kernel[(batch * heads,)](
        q.contiguous(), k.contiguous(), v.contiguous(), o, kv, k_sum, head_dim, value_dim, feat, *poly.args()[4:], eps,
        BD=bd, BD2=bd2, BV=block_v, **poly.flags(), NORMALIZE=normalize, CLAMP=poly.clamp,
        num_warps=4,
    )  # fmt: skip
    return o
