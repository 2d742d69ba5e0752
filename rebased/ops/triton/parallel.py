"""Tiled quadratic (parallel) linear attention for polynomial kernels: forward and backward Triton kernels.

The flash-attention schedule with sim = p(s) in place of exp and no running maximum (p is a polynomial:
nothing to overflow, so no rescaling). The T x T scores live only in registers, a tile at a time:

    s = scale q.k,  P = mask(p(s)),  den = P 1,  o = P V / (den + eps)                  (forward)

Backward, with r = 1 / (den + eps) and dd = -(do . o) per query row (computed in torch from the saved
den and o: cheap, elementwise):

    dA = (do V^T + dd 1^T) * r;   dS = dA * p'(s) * scale  (masked);   dq = dS K;   dk = dS^T Q;   dv = (P r)^T do

do v_j + dd = do . (v_j - o) cancels where v_j is close to o (exactly at t = 0, where o_0 = v_0 and dq_0 = 0)
while r is large there (ReBased's normaliser can be ~1e-4), so both terms must be fp32-accurate: o is kept
in fp32 for the backward, the forward's normaliser sums the same rounded scores its numerator uses, and the
do V^T dot takes do and v as they are (bf16 products are exact in fp32, summed in fp32), scaling by r only
afterwards. Rounding any of these in bf16 lost the first positions' dq entirely.

One program owns a block of query rows (forward, dq) or of key rows (dk, dv) of one (batch, head) and
loops over the other side's blocks up to the causal diagonal. Work is O(T^2 (D + V)), memory O(T): the
fastest path at short and moderate T, where the chunk kernel's feature-space state (D^2 x V per chunk)
costs more than the tiles it saves. Query blocks are launched longest-first to shorten the tail.

Shape letters: B batch, T time, H heads, D q/k dim (BD padded), V value dim (BV padded), M/N row blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from rebased.ops.common import LinearAttentionState, features
from rebased.ops.kernels import Polynomial
from rebased.ops.triton.chunk import _rows, _scores
from rebased.ops.triton.functions import _Poly, _precision, check_dtype_and_device, interpreting

MAX_GRID_Y = 65535  # CUDA's limit on the second grid axis, which holds batch x heads


@triton.jit
def _head_offsets(H, T, D, V):
    """Program axis 1 is batch x head: element offsets of (b, 0, h, 0) in q/k [B, T, H, D] and v [B, T, H, V]."""
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    return bh, (b * T * H + h) * D, (b * T * H + h) * V


@triton.jit
def parallel_fwd_kernel(q, k, v, o, den, T, H, D, V, scale, c0, c1, c2, eps,
                        BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
                        HAS0: tl.constexpr, HAS1: tl.constexpr, NORMALIZE: tl.constexpr, CLAMP: tl.constexpr,
                        PREC: tl.constexpr):  # fmt: skip
    m = tl.cdiv(T, BM) - 1 - tl.program_id(0)  # the longest rows first
    bh, qk_base, v_base = _head_offsets(H, T, D, V)
    rows = m * BM + tl.arange(0, BM)
    cd, cv = tl.arange(0, BD), tl.arange(0, BV)
    qt = _rows(q + qk_base, rows, cd, T, H * D, D)
    acc = tl.zeros([BM, BV], tl.float32)
    z = tl.zeros([BM], tl.float32)
    for start in range(0, tl.minimum((m + 1) * BM, T), BN):
        cols = start + tl.arange(0, BN)
        kt = _rows(k + qk_base, cols, cd, T, H * D, D)
        vt = _rows(v + v_base, cols, cv, T, H * V, V)
        p, _ = _scores(qt, kt, rows, cols, T, scale, c0, c1, c2, PREC, HAS0, HAS1)
        p = p.to(vt.dtype)  # 16-bit scores for the tensor cores; the normaliser sums the same rounded values,
        z += tl.sum(p.to(tl.float32), 1)  # so o stays an exact weighted mean of v (o_0 = v_0)
        acc += tl.dot(p, vt, input_precision=PREC)
    if NORMALIZE:
        acc = acc / ((tl.maximum(z, 0.0) if CLAMP else z) + eps)[:, None]
        tl.store(den + bh * T + rows, z, mask=rows < T)
    out = o + v_base + rows[:, None] * (H * V) + cv[None, :]  # fp32: the backward's dd needs o unrounded
    tl.store(out, acc, mask=(rows[:, None] < T) & (cv[None, :] < V))


@triton.jit
def parallel_dkdv_kernel(q, k, v, do, r, dd, dk, dv, T, H, D, V, scale, c0, c1, c2,
                         BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
                         HAS0: tl.constexpr, HAS1: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """dk, dv for one block of key rows: a walk over the query blocks at and after the diagonal."""
    n = tl.program_id(0)
    bh, qk_base, v_base = _head_offsets(H, T, D, V)
    cols = n * BN + tl.arange(0, BN)
    cd, cv = tl.arange(0, BD), tl.arange(0, BV)
    kt = _rows(k + qk_base, cols, cd, T, H * D, D)
    vt = _rows(v + v_base, cols, cv, T, H * V, V)
    dkt = tl.zeros([BN, BD], tl.float32)
    dvt = tl.zeros([BN, BV], tl.float32)
    for start in range((n * BN // BM) * BM, T, BM):
        rows = start + tl.arange(0, BM)
        qt = _rows(q + qk_base, rows, cd, T, H * D, D)
        dot = _rows(do + v_base, rows, cv, T, H * V, V)
        rt = tl.load(r + bh * T + rows, mask=rows < T, other=0.0)
        ddt = tl.load(dd + bh * T + rows, mask=rows < T, other=0.0)
        p, dp = _scores(qt, kt, rows, cols, T, scale, c0, c1, c2, PREC, HAS0, HAS1)  # [M, N]
        da = (tl.dot(dot, tl.trans(vt), input_precision=PREC) + ddt[:, None]) * rt[:, None]
        dvt += tl.dot(tl.trans((p * rt[:, None]).to(dot.dtype)), dot, input_precision=PREC)
        dkt += tl.dot(tl.trans((da * dp).to(qt.dtype)), qt, input_precision=PREC)
    mask = cols[:, None] < T
    tl.store(dk + qk_base + cols[:, None] * (H * D) + cd[None, :], dkt.to(dk.dtype.element_ty), mask=mask & (cd < D))
    tl.store(dv + v_base + cols[:, None] * (H * V) + cv[None, :], dvt.to(dv.dtype.element_ty), mask=mask & (cv < V))


@triton.jit
def parallel_dq_kernel(q, k, v, do, r, dd, dq, T, H, D, V, scale, c0, c1, c2,
                       BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
                       HAS0: tl.constexpr, HAS1: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """dq for one block of query rows: a walk over the key blocks up to the diagonal."""
    m = tl.cdiv(T, BM) - 1 - tl.program_id(0)
    bh, qk_base, v_base = _head_offsets(H, T, D, V)
    rows = m * BM + tl.arange(0, BM)
    cd, cv = tl.arange(0, BD), tl.arange(0, BV)
    qt = _rows(q + qk_base, rows, cd, T, H * D, D)
    dot = _rows(do + v_base, rows, cv, T, H * V, V)
    rt = tl.load(r + bh * T + rows, mask=rows < T, other=0.0)
    ddt = tl.load(dd + bh * T + rows, mask=rows < T, other=0.0)
    dqt = tl.zeros([BM, BD], tl.float32)
    for start in range(0, tl.minimum((m + 1) * BM, T), BN):
        cols = start + tl.arange(0, BN)
        kt = _rows(k + qk_base, cols, cd, T, H * D, D)
        vt = _rows(v + v_base, cols, cv, T, H * V, V)
        _, dp = _scores(qt, kt, rows, cols, T, scale, c0, c1, c2, PREC, HAS0, HAS1)
        da = (tl.dot(dot, tl.trans(vt), input_precision=PREC) + ddt[:, None]) * rt[:, None]
        dqt += tl.dot((da * dp).to(kt.dtype), kt, input_precision=PREC)
    mask = (rows[:, None] < T) & (cd[None, :] < D)
    tl.store(dq + qk_base + rows[:, None] * (H * D) + cd[None, :], dqt.to(dq.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class TileConfig:
    """One kernel's launch: block_m query rows x block_n key rows per tile, warps, software-pipeline stages."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


# (forward, dk/dv, dq). Fixed, as the interpreter cannot autotune; benchmarks/sweep_parallel.py times others.
GPU_CONFIGS = (TileConfig(), TileConfig(), TileConfig())
# Under the interpreter: 16 x 16 tiles, so tiny test shapes still cross several blocks.
INTERPRETER_CONFIGS = (TileConfig(16, 16), TileConfig(16, 16), TileConfig(16, 16))
CONFIG_OVERRIDE: tuple[TileConfig, TileConfig, TileConfig] | None = None  # set by benchmarks and tests


def launch_configs() -> tuple[TileConfig, TileConfig, TileConfig]:
    if CONFIG_OVERRIDE is not None:
        return CONFIG_OVERRIDE
    return INTERPRETER_CONFIGS if interpreting() else GPU_CONFIGS


def _launch(cfg: TileConfig, head_dim: int, value_dim: int) -> dict:
    """The kernels' block constexprs and launch options for one config."""
    return dict(BM=cfg.block_m, BN=cfg.block_n, BD=max(16, triton.next_power_of_2(head_dim)),
                BV=max(16, triton.next_power_of_2(value_dim)), num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)  # fmt: skip


def _poly_args(poly: _Poly) -> dict:
    return dict(scale=poly.scale, c0=poly.c0, c1=poly.c1, c2=poly.c2, HAS0=poly.c0 > 0, HAS1=poly.c1 > 0)


class ParallelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, poly: _Poly, normalize: bool, eps: float):
        batch, length, heads, head_dim = q.shape
        value_dim = v.shape[-1]
        fwd = launch_configs()[0]
        o = torch.empty(v.shape, dtype=torch.float32, device=v.device)
        den = q.new_empty(batch, heads, length, dtype=torch.float32)
        parallel_fwd_kernel[(triton.cdiv(length, fwd.block_m), batch * heads)](
            q, k, v, o, den, length, heads, head_dim, value_dim, eps=eps, **_poly_args(poly),
            **_launch(fwd, head_dim, value_dim), NORMALIZE=normalize, CLAMP=poly.clamp, PREC=_precision(q.dtype),
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, o, den)
        ctx.poly, ctx.normalize, ctx.eps = poly, normalize, eps
        return o.to(v.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, den = ctx.saved_tensors
        batch, length, heads, head_dim = q.shape
        value_dim = v.shape[-1]
        do = do.to(v.dtype).contiguous()
        r, dd = _row_terms(do, o, den, ctx.poly.clamp, ctx.normalize, ctx.eps)
        _, dkdv, dqc = launch_configs()
        args = dict(**_poly_args(ctx.poly), PREC=_precision(q.dtype))
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        parallel_dkdv_kernel[(triton.cdiv(length, dkdv.block_n), batch * heads)](
            q, k, v, do, r, dd, dk, dv, length, heads, head_dim, value_dim, **args, **_launch(dkdv, head_dim, value_dim)
        )
        parallel_dq_kernel[(triton.cdiv(length, dqc.block_m), batch * heads)](
            q, k, v, do, r, dd, dq, length, heads, head_dim, value_dim, **args, **_launch(dqc, head_dim, value_dim)
        )
        return dq, dk, dv, None, None, None


def _row_terms(do: Tensor, o: Tensor, den: Tensor, clamp: bool, normalize: bool, eps: float):
    """Per query row, fp32 [B, H, T]: r = 1 / (den + eps) and dd = -(do . o), with o the fp32 output (r = 1,
    dd = 0 without normalisation; dd = 0 where a clamped denominator had no gradient)."""
    batch, length, heads, _ = do.shape
    if not normalize:
        ones = do.new_ones(batch, heads, length, dtype=torch.float32)
        return ones, torch.zeros_like(ones)
    r = 1.0 / ((den.clamp_min(0.0) if clamp else den) + eps)
    dd = -(do.float() * o).sum(-1).transpose(1, 2)
    if clamp:
        dd = dd.masked_fill(den < 0, 0.0)
    return r.contiguous(), dd.contiguous()


def parallel_linear_attention(
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
    """The ("parallel", "triton") pair. The final state, when asked for, is summed in torch in feature space
    (one matmul); an initial state is not covered (the chunk kernel takes one)."""
    del chunk_size
    what = "(mode='parallel', backend='triton')"
    check_dtype_and_device(what, q, k, v)
    if initial_state is not None:
        raise NotImplementedError(f"{what} does not take an initial state: use mode='chunk'")
    if q.shape[-1] > 128 or v.shape[-1] > 128:
        raise NotImplementedError(f"{what} covers q/k and value dims up to 128, got {q.shape[-1]}, {v.shape[-1]}")
    if q.shape[0] * q.shape[2] > MAX_GRID_Y:
        raise NotImplementedError(f"{what} covers batch x heads up to {MAX_GRID_Y}, got {q.shape[0] * q.shape[2]}")
    poly = _Poly.of(kernel)
    o = ParallelFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), poly, normalize, eps)
    final_state = None
    if output_final_state:
        phi_k = features(k.float(), kernel)  # [B, T, H, F]
        kv = torch.einsum("bthf,bthv->bhfv", phi_k, v.float())
        final_state = LinearAttentionState(kv, phi_k.sum(1))
    return o, final_state
