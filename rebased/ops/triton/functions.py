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


# Set by benchmarks/ and tests to pin the configs: one for both passes, or a (forward, backward) pair.
CONFIG_OVERRIDE: Config | tuple[Config, Config] | None = None


def pick_config(head_dim: int, value_dim: int, dtype: torch.dtype = torch.bfloat16) -> tuple[Config, Config]:
    """(forward, backward) launch configs, fixed (the interpreter cannot autotune). The quadratic state
    [BD^2, BV] fp32 and the chunk's features [C, BD^2] live in registers, and the backward holds twice
    as many tiles: it takes shorter chunks, which keeps its shared memory under the 227 KiB a block
    may use on Hopper (C = 64 with BV = 64 asked for 285 KiB)."""
    if CONFIG_OVERRIDE is not None:
        return CONFIG_OVERRIDE if isinstance(CONFIG_OVERRIDE, tuple) else (CONFIG_OVERRIDE, CONFIG_OVERRIDE)
    bd = max(16, triton.next_power_of_2(head_dim))
    bv_max = max(16, triton.next_power_of_2(value_dim))
    if interpreting():
        return (Config(32, min(32, bv_max), 4),) * 2
    wide = 2 if dtype == torch.float32 else 1  # fp32 tiles take twice the shared memory
    # The compiled forward with block_v 16 and 8 warps hits an illegal memory access on the H200 (value
    # dims 5, 8, 16); block_v 32 with 8 warps, or 16 with 4 warps, run correctly
    # (benchmarks/results/h200_mqar/triton_variants.log). So the forward never takes block_v 16 with 8 warps.
    if bd <= 16:
        return Config(64, 32, 8), Config(32, min(64 // wide, bv_max), 8)
    return Config(32, 16, 4), Config(16, 16, 8)


def segment_tokens(fwd: Config, bwd: Config, programs: int, length: int, device: torch.device) -> int:
    """Tokens per segment: the whole sequence when batch x heads x V blocks fill the GPU twice over, else
    enough segments to bring the programs to about four per multiprocessor (each extra segment costs a
    pass over the segment's states). A multiple of both chunk lengths, so both walks agree on it."""
    step = max(fwd.block_t, bwd.block_t)
    n_steps = triton.cdiv(length, step)
    if fwd.segment_chunks is not None:
        return fwd.segment_chunks * fwd.block_t
    sms = 8 if interpreting() else torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= 2 * sms:
        return n_steps * step
    return step * max(4, triton.cdiv(n_steps, triton.cdiv(4 * sms, programs)))


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
    """Block sizes and the sequence segmentation shared by the forward and backward of one call."""

    fwd: Config
    bwd: Config
    bd: int
    bd2: int
    seg_tokens: int
    num_seg: int

    @classmethod
    def of(cls, q: Tensor, value_dim: int, poly: _Poly) -> _Launch:
        batch, length, heads, head_dim = q.shape
        fwd, bwd = pick_config(head_dim, value_dim, q.dtype)
        bd, bd2 = _blocks(head_dim, poly)
        programs = triton.cdiv(value_dim, fwd.block_v) * batch * heads
        seg_tokens = segment_tokens(fwd, bwd, programs, length, q.device)
        return cls(fwd, bwd, bd, bd2, seg_tokens, triton.cdiv(length, seg_tokens))

    def num_v(self, cfg: Config, value_dim: int) -> int:
        return triton.cdiv(value_dim, cfg.block_v)

    def grid(self, cfg: Config, batch_heads: int, value_dim: int) -> tuple[int, int, int]:
        return (self.num_v(cfg, value_dim), batch_heads, self.num_seg)

    def args(self, cfg: Config) -> dict:
        """The kernels' block constexprs and SEG, the segment in this config's chunks."""
        return dict(SEG=self.seg_tokens // cfg.block_t, BT=cfg.block_t, BD=self.bd, BD2=self.bd2, BV=cfg.block_v)


def _segment_sums(launch, cfg, x, y, den, dd, poly, normalize, eps, feat, grad: bool) -> tuple[Tensor, Tensor]:
    """Each segment's own state sums: [B H, NS, F, V] and [B H, NS, F] (see chunk_state_kernel)."""
    batch, length, heads, head_dim = x.shape
    value_dim = y.shape[-1]
    s = x.new_empty(batch * heads, launch.num_seg, feat, value_dim, dtype=torch.float32)
    z = x.new_empty(batch * heads, launch.num_seg, feat, dtype=torch.float32)
    scale, c0, c1, c2, a0, a1, a2 = poly.args()
    chunk_state_kernel[launch.grid(cfg, batch * heads, value_dim)](
        x, y, den, dd, s, z, length, heads, head_dim, value_dim, feat, a0, a1, a2, eps, **launch.args(cfg),
        **poly.flags(), GRAD=grad, NORMALIZE=normalize, PREC=_precision(x.dtype), num_warps=cfg.num_warps,
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
            sums = _segment_sums(launch, launch.fwd, k, v, den, den, poly, normalize, eps, feat, grad=False)
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
        chunk_fwd_kernel[launch.grid(launch.fwd, batch * heads, value_dim)](
            q, k, v, o, den, s_in if s_in is not None else o, z_in if z_in is not None else o,
            final[0] if store_final else o, final[1] if store_final else o,
            length, heads, head_dim, value_dim, feat, *poly.args(), eps, **launch.args(launch.fwd),
            **poly.flags(), USE_INIT=s_in is not None, STORE_FINAL=store_final, NORMALIZE=normalize,
            CLAMP=poly.clamp, PREC=_precision(q.dtype), num_warps=launch.fwd.num_warps,
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
            sums = _segment_sums(launch, launch.bwd, q, do, den, dd, poly, ctx.normalize, ctx.eps, feat, grad=True)
            (ds_in, ds_total), (dz_in, dz_total) = _exclusive(sums[0], True), _exclusive(sums[1], True)
            if d_kv is not None:
                ds_in, dz_in = ds_in + d_kv.flatten(0, 1)[:, None], dz_in + d_ksum.flatten(0, 1)[:, None]
                ds_total, dz_total = ds_total + d_kv.flatten(0, 1), dz_total + d_ksum.flatten(0, 1)
            if ctx.has_init:
                d_init = [ds_total.view(batch, heads, feat, value_dim), dz_total.view(batch, heads, feat)]
        elif ctx.has_init:
            d_init = [torch.empty_like(s_in), torch.empty_like(z_in)]
        store_dinit = ctx.has_init and launch.num_seg == 1
        dq = q.new_empty(launch.num_v(launch.bwd, value_dim), batch, length, heads, head_dim, dtype=torch.float32)
        dk, dv = torch.empty_like(dq), torch.empty_like(v)
        chunk_bwd_kernel[launch.grid(launch.bwd, batch * heads, value_dim)](
            q, k, v, do, den, dd, s_in if s_in is not None else dq, z_in if z_in is not None else dq,
            ds_in if ds_in is not None else dq, dz_in if dz_in is not None else dq, dq, dk, dv,
            d_init[0] if store_dinit else dq, d_init[1] if store_dinit else dq,
            length, heads, head_dim, value_dim, feat, *poly.args(), ctx.eps, **launch.args(launch.bwd),
            **poly.flags(), USE_INIT=s_in is not None, USE_DS_IN=ds_in is not None, STORE_DINIT=store_dinit,
            NORMALIZE=ctx.normalize, PREC=_precision(q.dtype), num_warps=launch.bwd.num_warps,
        )  # fmt: skip
        dq, dk = dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype)
        return dq, dk, dv, d_init[0], d_init[1], None, None, None, None


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs get fp32-accurate dots (three tf32 products, on tensor cores: a plain fp32 dot of these
    tiles spills tens of KiB a thread); 16-bit inputs let the fp32 state dots run in tf32."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def check_dtype_and_device(what: str, *tensors: Tensor) -> None:
    """The refusals every fused kernel shares: dtype (one of SUPPORTED_DTYPES, the same for all) and device."""
    q = tensors[0]
    if q.dtype not in SUPPORTED_DTYPES:
        raise NotImplementedError(f"{what} supports float32, bfloat16 and float16, got {q.dtype}")
    if any(x.dtype != q.dtype for x in tensors):
        raise NotImplementedError(f"{what} needs one dtype for q, k, v, got {[str(x.dtype) for x in tensors]}")
    if not (q.is_cuda or interpreting()):
        raise NotImplementedError(f"{what} needs CUDA tensors (or TRITON_INTERPRET=1), got device {q.device}")


def check_head_dims(what: str, q: Tensor, v: Tensor, limit: int = 128) -> None:
    """The tiled kernels' (parallel, chunk-states) q/k and value dim limit: one tile holds a whole head."""
    if q.shape[-1] > limit or v.shape[-1] > limit:
        raise NotImplementedError(f"{what} covers q/k and value dims up to {limit}, got {q.shape[-1]}, {v.shape[-1]}")


def _check_dims(q: Tensor, kernel: Polynomial | None, what: str) -> None:
    """The chunk kernel's and the decode step's q/k dim limits."""
    if (kernel is None or kernel.c2 == 0) and q.shape[-1] > 128:
        raise NotImplementedError(f"{what} takes q, k without a quadratic term up to dim 128, got {q.shape[-1]}")
    if kernel is not None and kernel.c2 > 0 and q.shape[-1] > 16:
        # a chunk's D^2 quadratic features and the [D^2, BV] state must fit one block's shared memory
        # (227 KiB on Hopper): at D = 32 the smallest tiles (C = 16, BV = 16) still ask for 320 KiB
        raise NotImplementedError(f"{what} supports quadratic kernels with q/k dim <= 16, got {q.shape[-1]}")


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
    check_dtype_and_device("(mode='chunk', backend='triton')", q, k, v)
    _check_dims(q, kernel, "(mode='chunk', backend='triton')")
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
    check_dtype_and_device("triton step", q)
    _check_dims(q, kernel, "triton step")
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
