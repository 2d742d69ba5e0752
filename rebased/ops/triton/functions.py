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
from rebased.ops.triton.chunk import chunk_bwd_kernel, chunk_fwd_kernel, chunk_state_kernel
from rebased.ops.triton.step_kernel import step_kernel

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Config:
    block_t: int  # chunk length C
    block_v: int  # value columns per program
    num_warps: int
    segment_chunks: int | None = None  # chunks per sequence segment; None: enough segments to fill the GPU


# Set by benchmarks/ and tests to pin a config; None picks by shape.
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
        return Config(block_t=64, block_v=min(64, bv_max), num_warps=4)
    return Config(block_t=32, block_v=16, num_warps=4)


def segment_chunks(cfg: Config, programs: int, n_chunks: int, device: torch.device) -> int:
    """Chunks per segment: one segment when batch x heads x V blocks fill the GPU twice over, else as many
    as bring the programs to about four per multiprocessor (each extra segment costs a state pass)."""
    if cfg.segment_chunks is not None:
        return cfg.segment_chunks
    sms = 8 if interpreting() else torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= 2 * sms:
        return n_chunks
    return max(4, triton.cdiv(n_chunks, triton.cdiv(4 * sms, programs)))


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

    def kernel(self) -> Polynomial:
        return Polynomial(self.c0, self.c1, self.c2, self.scale)

    @property
    def clamp(self) -> bool:
        return self.kernel().non_negative


def _blocks(head_dim: int, poly: _Poly) -> tuple[int, int]:
    bd = max(16, triton.next_power_of_2(head_dim))
    return bd, (bd * bd if poly.c2 > 0 else 16)  # BD2 is unused without a quadratic term: keep it tiny


@dataclass(frozen=True)
class _Launch:
    """Grid and block sizes shared by the forward and backward of one call."""

    cfg: Config
    bd: int
    bd2: int
    num_v: int
    seg: int  # chunks per segment
    num_seg: int

    @classmethod
    def of(cls, q: Tensor, value_dim: int, poly: _Poly) -> _Launch:
        batch, length, heads, head_dim = q.shape
        cfg = pick_config(head_dim, value_dim)
        bd, bd2 = _blocks(head_dim, poly)
        num_v = triton.cdiv(value_dim, cfg.block_v)
        n_chunks = triton.cdiv(length, cfg.block_t)
        seg = segment_chunks(cfg, num_v * batch * heads, n_chunks, q.device)
        return cls(cfg, bd, bd2, num_v, seg, triton.cdiv(n_chunks, seg))

    def grid(self, batch_heads: int) -> tuple[int, int, int]:
        return (self.num_v, batch_heads, self.num_seg)

    def blocks(self) -> dict:
        return dict(BT=self.cfg.block_t, BD=self.bd, BD2=self.bd2, BV=self.cfg.block_v)


def _segment_sums(launch, x, y, den, dd, poly, normalize, eps, feat, grad: bool) -> tuple[Tensor, Tensor]:
    """Each segment's own state sums: [B H, NS, F, V] and [B H, NS, F] (see chunk_state_kernel)."""
    batch, length, heads, head_dim = x.shape
    value_dim = y.shape[-1]
    s = x.new_empty(batch * heads, launch.num_seg, feat, value_dim, dtype=torch.float32)
    z = x.new_empty(batch * heads, launch.num_seg, feat, dtype=torch.float32)
    scale, c0, c1, c2, a0, a1, a2 = poly.args()
    chunk_state_kernel[launch.grid(batch * heads)](
        x, y, den, dd, s, z, length, heads, head_dim, value_dim, feat, a0, a1, a2, eps, launch.seg,
        **launch.blocks(), **poly.flags(), GRAD=grad, NORMALIZE=normalize, PREC=_precision(x.dtype),
        num_warps=launch.cfg.num_warps,
    )  # fmt: skip
    return s, z


def _exclusive(x: Tensor, reverse: bool) -> tuple[Tensor, Tensor]:
    """Along the segment dim 1: (sums of the segments before each one [or after, reverse], the total)."""
    incl = (x.flip(1).cumsum(1).flip(1) if reverse else x.cumsum(1)).contiguous()
    zero = torch.zeros_like(x[:, :1])
    excl = torch.cat([incl[:, 1:], zero], 1) if reverse else torch.cat([zero, incl[:, :-1]], 1)
    return excl, incl[:, 0] if reverse else incl[:, -1]


class ChunkFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kv0, ksum0, poly: _Poly, output_final_state: bool, normalize: bool, eps: float):
        batch, length, heads, head_dim = q.shape
        value_dim, feat = v.shape[-1], feature_dim(head_dim, poly.kernel())
        launch = _Launch.of(q, value_dim, poly)
        o = torch.empty_like(v)
        den = q.new_empty(batch, length, heads, dtype=torch.float32)
        final = [None, None]
        s_in, z_in = kv0, ksum0
        if launch.num_seg > 1:  # each segment starts from the initial state plus the segments before it
            sums = _segment_sums(launch, k, v, den, den, poly, normalize, eps, feat, grad=False)
            (s_in, s_total), (z_in, z_total) = _exclusive(sums[0], False), _exclusive(sums[1], False)
            if kv0 is not None:
                s_in, z_in = s_in + kv0.flatten(0, 1)[:, None], z_in + ksum0.flatten(0, 1)[:, None]
                s_total, z_total = s_total + kv0.flatten(0, 1), z_total + ksum0.flatten(0, 1)
            if output_final_state:
                final = [s_total.view(batch, heads, feat, value_dim), z_total.view(batch, heads, feat)]
        elif output_final_state:
            final = [q.new_empty(batch, heads, feat, value_dim, dtype=torch.float32)]
            final.append(q.new_empty(batch, heads, feat, dtype=torch.float32))
        store_final = output_final_state and launch.num_seg == 1
        chunk_fwd_kernel[launch.grid(batch * heads)](
            q, k, v, o, den, s_in if s_in is not None else o, z_in if z_in is not None else o,
            final[0] if store_final else o, final[1] if store_final else o,
            length, heads, head_dim, value_dim, feat, *poly.args(), eps, launch.seg, **launch.blocks(),
            **poly.flags(), USE_INIT=s_in is not None, STORE_FINAL=store_final, NORMALIZE=normalize,
            CLAMP=poly.clamp, PREC=_precision(q.dtype), num_warps=launch.cfg.num_warps,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, o, den, s_in, z_in)
        ctx.poly, ctx.normalize, ctx.eps, ctx.feat, ctx.launch = poly, normalize, eps, feat, launch
        ctx.has_init = kv0 is not None
        return o, final[0], final[1]

    @staticmethod
    def backward(ctx, do, d_kv, d_ksum):
        q, k, v, o, den, s_in, z_in = ctx.saved_tensors
        poly, feat, launch = ctx.poly, ctx.feat, ctx.launch
        batch, length, heads, head_dim = q.shape
        value_dim = v.shape[-1]
        do = do.contiguous()
        # the normaliser's gradient, one number a token: -(do . o) / (den + eps), in fp32
        dd = -(do.float() * o.float()).sum(-1) / (den + ctx.eps) if ctx.normalize else den
        if d_kv is not None or d_ksum is not None:
            d_kv = torch.zeros(batch, heads, feat, value_dim, device=q.device) if d_kv is None else d_kv
            d_ksum = torch.zeros(batch, heads, feat, device=q.device) if d_ksum is None else d_ksum
            d_kv, d_ksum = d_kv.float().contiguous(), d_ksum.float().contiguous()
        ds_in, dz_in, d_init = d_kv, d_ksum, [None, None]
        if launch.num_seg > 1:  # each segment's end receives what later segments and the final state send
            sums = _segment_sums(launch, q, do, den, dd, poly, ctx.normalize, ctx.eps, feat, grad=True)
            (ds_in, ds_total), (dz_in, dz_total) = _exclusive(sums[0], True), _exclusive(sums[1], True)
            if d_kv is not None:
                ds_in, dz_in = ds_in + d_kv.flatten(0, 1)[:, None], dz_in + d_ksum.flatten(0, 1)[:, None]
                ds_total, dz_total = ds_total + d_kv.flatten(0, 1), dz_total + d_ksum.flatten(0, 1)
            if ctx.has_init:
                d_init = [ds_total.view(batch, heads, feat, value_dim), dz_total.view(batch, heads, feat)]
        elif ctx.has_init:
            d_init = [torch.empty_like(s_in), torch.empty_like(z_in)]
        store_dinit = ctx.has_init and launch.num_seg == 1
        dq = q.new_empty(launch.num_v, batch, length, heads, head_dim, dtype=torch.float32)
        dk, dv = torch.empty_like(dq), torch.empty_like(v)
        chunk_bwd_kernel[launch.grid(batch * heads)](
            q, k, v, do, den, dd, s_in if s_in is not None else dq, z_in if z_in is not None else dq,
            ds_in if ds_in is not None else dq, dz_in if dz_in is not None else dq, dq, dk, dv,
            d_init[0] if store_dinit else dq, d_init[1] if store_dinit else dq,
            length, heads, head_dim, value_dim, feat, *poly.args(), ctx.eps, launch.seg, **launch.blocks(),
            **poly.flags(), USE_INIT=s_in is not None, USE_DS_IN=ds_in is not None, STORE_DINIT=store_dinit,
            NORMALIZE=ctx.normalize, PREC=_precision(q.dtype), num_warps=launch.cfg.num_warps,
        )  # fmt: skip
        dq, dk = dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype)
        return dq, dk, dv, d_init[0], d_init[1], None, None, None, None


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
