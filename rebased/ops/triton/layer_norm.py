"""LayerNorm over the last dim with its affine and the output cast in one pass: forward and backward kernels.

    mu = mean(x),  r = 1 / sqrt(var(x) + eps),  x^ = (x - mu) r,  y = x^ gamma + beta     (per row, fp32 math)
    dx = r (g - x^ mean(g x^) - mean(g)),  g = dy gamma;   dgamma = sum_rows dy x^,   dbeta = sum_rows dy

Without the norm (NORMALISE off: the kernel ablation's gamma x and gamma x + beta maps), x^ = x and dx = g: the
same single pass, cast and per-program gamma/beta sums, for an affine that torch would run as a handful of
elementwise kernels and reductions in fp32.

Why a kernel of our own: in a ReBased MQAR step the feature map's two LayerNorms (over H * D = 192 features of
~10^5 rows) and the casts around them took a quarter of the GPU time (benchmarks/results/h200_mqar/
mqar_profile.log): PyTorch's gamma/beta backward is slow for many short rows, and under autocast its LayerNorm
returns fp32 that the mixer then casts to bf16. Here the output is written once, in the dtype the next op
takes, and the gamma/beta gradients are per-program partial sums (fixed partition: deterministic) that torch
adds up. The official ReBased norm spans all heads jointly, so it cannot be folded into a per-head attention
program's loads; a separate pass is the fusion that fits it.

Shape letters: M rows, N features (BN padded), BM rows per tile, P backward programs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from rebased.ops.triton.launch import interpreting, sm_count

MAX_FEATURES = 8192  # one row per tile register block; wider rows go to torch


@dataclass(frozen=True)
class NormLaunch:
    """One kernel's GPU launch: a tile of about tile_bytes of input (rows x padded features x the input's element
    size) and warps a program; the backward also runs programs_per_sm programs on each SM, each walking its share
    of the row blocks, and with tile_sums keeps its gamma/beta sums as whole tiles until its last block (a sum
    over a tile's rows crosses warps, through shared memory and a barrier: once a program rather than twice a
    block, for a tile of accumulators' registers)."""

    tile_bytes: int
    warps: int
    programs_per_sm: int = 8
    tile_sums: bool = False


# On an H200 (benchmarks/layer_norm_bench.py sweeps them, each kernel alone at 262,144 rows: the MQAR cases of 64
# and 128 fp32 features, 192 and 384 bf16; benchmarks/results/h200_mqar/layer_norm_811f055.md). The backward: 4 KB
# tiles with gamma's and beta's sums kept as whole tiles, the fastest in two cases and within 0.02 ms in the
# others, 0.54 ms over the four against 0.80 for 16 KB tiles summed a block at a time (0.12 against 0.24 at 192
# bf16). The forward: 16 KB tiles, within 0.02 ms of the fastest in three cases (0.30 ms over the four; 4 KB
# tiles 0.28, ahead at 64 fp32 features and behind at 384 bf16), differences the size of the sweep's noise.
FORWARD_LAUNCH = NormLaunch(tile_bytes=16384, warps=4)
BACKWARD_LAUNCH = NormLaunch(tile_bytes=4096, warps=4, programs_per_sm=8, tile_sums=True)


@triton.jit
def _tile(x, rows, cols, M, N):
    """Rows x cols of an [M, N] tensor as fp32, 0 outside; the offsets and mask."""
    offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    return tl.load(x + offsets, mask=mask, other=0.0).to(tl.float32), offsets, mask


@triton.jit
def _affine(w, b, cols, N, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """gamma and beta as fp32 [BN] (1 and 0 where absent)."""
    gamma = cols.to(tl.float32) * 0.0 + 1.0
    beta = cols.to(tl.float32) * 0.0
    if HAS_W:
        gamma = tl.load(w + cols, mask=cols < N, other=0.0).to(tl.float32)
    if HAS_B:
        beta = tl.load(b + cols, mask=cols < N, other=0.0).to(tl.float32)
    return gamma, beta


@triton.jit
def layer_norm_fwd_kernel(x, w, b, y, mean, rstd, M, N, eps, BM: tl.constexpr, BN: tl.constexpr,
                          HAS_W: tl.constexpr, HAS_B: tl.constexpr, NORMALISE: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BN)
    xt, offsets, mask = _tile(x, rows, cols, M, N)
    if NORMALISE:
        mu = tl.sum(xt, axis=1) / N
        centred = tl.where(mask, xt - mu[:, None], 0.0)
        r = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / N + eps)
        xt = centred * r[:, None]
    gamma, beta = _affine(w, b, cols, N, HAS_W, HAS_B)  # loaded after the row statistics: fewer live registers
    yt = xt * gamma[None, :] + beta[None, :]
    tl.store(y + offsets, yt.to(y.dtype.element_ty), mask=mask)
    if NORMALISE:
        tl.store(mean + rows, mu, mask=rows < M)
        tl.store(rstd + rows, r, mask=rows < M)


@triton.jit
def layer_norm_bwd_kernel(x, w, dy, mean, rstd, dx, parts, M, N, BM: tl.constexpr, BN: tl.constexpr,
                          HAS_W: tl.constexpr, TILE_SUMS: tl.constexpr, NORMALISE: tl.constexpr):  # fmt: skip
    """Program p takes row blocks p, p + P, p + 2P, ...; its gamma and beta gradient sums go to parts[p, 0] and
    parts[p, 1] of the [P, 2, N] partials (every program writes both rows, so they need no zeroing)."""
    pid, programs = tl.program_id(0), tl.num_programs(0)
    cols = tl.arange(0, BN)
    gamma, no_beta = _affine(w, w, cols, N, HAS_W, False)  # (compiled Triton: '_' must not be reused in the loop)
    dw_acc = tl.zeros([BN], tl.float32)
    db_acc = tl.zeros([BN], tl.float32)
    dw_tile = tl.zeros([BM, BN], tl.float32)
    db_tile = tl.zeros([BM, BN], tl.float32)
    for start in range(pid * BM, M, programs * BM):
        rows = start + tl.arange(0, BM)
        xt, offsets, mask = _tile(x, rows, cols, M, N)
        dyt, same_offsets, same_mask = _tile(dy, rows, cols, M, N)
        g = dyt * gamma[None, :]
        if NORMALISE:
            mu = tl.load(mean + rows, mask=rows < M, other=0.0)
            r = tl.load(rstd + rows, mask=rows < M, other=0.0)
            xhat = tl.where(mask, (xt - mu[:, None]) * r[:, None], 0.0)
            dxt = (g - xhat * (tl.sum(g * xhat, axis=1) / N)[:, None] - (tl.sum(g, axis=1) / N)[:, None]) * r[:, None]
        else:
            xhat = xt
            dxt = g
        tl.store(dx + offsets, dxt.to(dx.dtype.element_ty), mask=mask)
        if TILE_SUMS:
            dw_tile += dyt * xhat
            db_tile += dyt
        else:
            dw_acc += tl.sum(dyt * xhat, axis=0)
            db_acc += tl.sum(dyt, axis=0)
    if TILE_SUMS:
        dw_acc = tl.sum(dw_tile, axis=0)
        db_acc = tl.sum(db_tile, axis=0)
    tl.store(parts + pid * 2 * N + cols, dw_acc, mask=cols < N)
    tl.store(parts + (pid * 2 + 1) * N + cols, db_acc, mask=cols < N)


def _blocks(features: int, element_size: int, launch: NormLaunch) -> tuple[int, int]:
    """(BM, BN): tiles of about launch.tile_bytes of input on the GPU; 4 rows under the interpreter, so tiny tests
    cross several row blocks."""
    bn = max(16, triton.next_power_of_2(features))
    return (4 if interpreting() else max(1, launch.tile_bytes // (bn * element_size))), bn


def _backward_programs(row_blocks: int, device: torch.device, launch: NormLaunch) -> int:
    if interpreting():
        return min(row_blocks, 3)
    return min(row_blocks, launch.programs_per_sm * sm_count(device))


def launch_forward(x2: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, out_dtype: torch.dtype,
                   launch: NormLaunch, normalise: bool = True) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The forward kernel on rows x2 [M, N]: y [M, N] in out_dtype, and each row's mean and 1 / std [M] (not
    written without the norm)."""
    rows, features = x2.shape
    y = torch.empty(x2.shape, dtype=out_dtype, device=x2.device)
    mean = torch.empty(rows, dtype=torch.float32, device=x2.device)
    rstd = torch.empty_like(mean)
    bm, bn = _blocks(features, x2.element_size(), launch)
    if rows:
        layer_norm_fwd_kernel[(triton.cdiv(rows, bm),)](
            x2, weight if weight is not None else x2, bias if bias is not None else x2, y, mean, rstd,
            rows, features, eps, BM=bm, BN=bn, HAS_W=weight is not None, HAS_B=bias is not None,
            NORMALISE=normalise, num_warps=launch.warps,
        )  # fmt: skip
    return y, mean, rstd


def launch_backward(x2: Tensor, weight: Tensor | None, dy2: Tensor, mean: Tensor, rstd: Tensor,
                    launch: NormLaunch, normalise: bool = True) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The backward kernel for the forward's rows x2 [M, N], mean and rstd: dx [M, N] in x2's dtype, and the fp32
    gamma and beta gradients [N] (whether or not the forward had them)."""
    rows, features = x2.shape
    dx = torch.empty_like(x2)
    bm, bn = _blocks(features, x2.element_size(), launch)
    programs = _backward_programs(triton.cdiv(rows, bm), x2.device, launch)
    # gamma's and beta's partials side by side, summed in one reduction: one kernel and one sum a backward
    # rather than two zero fills, the kernel and two sums (a graphed MQAR step runs 28 of these backwards, and
    # each small kernel costs microseconds whatever its size)
    parts = torch.empty(programs, 2, features, dtype=torch.float32, device=x2.device)
    if programs:
        layer_norm_bwd_kernel[(programs,)](
            x2, weight if weight is not None else x2, dy2, mean, rstd, dx, parts, rows, features,
            BM=bm, BN=bn, HAS_W=weight is not None, TILE_SUMS=launch.tile_sums, NORMALISE=normalise,
            num_warps=launch.warps,
        )  # fmt: skip
    dw, db = parts.sum(0)  # zeros when there are no programs (no rows)
    return dx, dw, db


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, out_dtype: torch.dtype,
                normalise: bool):  # fmt: skip
        shape, features = x.shape, x.shape[-1]
        x2 = x.reshape(-1, features).contiguous()
        y, mean, rstd = launch_forward(x2, weight, bias, eps, out_dtype, FORWARD_LAUNCH, normalise)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.shape, ctx.bias_dtype, ctx.normalise = shape, None if bias is None else bias.dtype, normalise
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2, weight, mean, rstd = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape).contiguous()
        dx, dw, db = launch_backward(x2, weight, dy2, mean, rstd, BACKWARD_LAUNCH, ctx.normalise)
        dw = None if weight is None else dw.to(weight.dtype)
        db = None if ctx.bias_dtype is None else db.to(ctx.bias_dtype)
        return dx.reshape(ctx.shape), dw, db, None, None, None


def _check(x: Tensor, what: str) -> None:
    if x.device.type != "cuda" and not interpreting():
        raise NotImplementedError(f"{what}(backend='triton') needs CUDA tensors, got {x.device.type}")
    if x.shape[-1] > MAX_FEATURES:
        raise NotImplementedError(f"{what}(backend='triton') covers rows up to {MAX_FEATURES}, got {x.shape[-1]}")


def fused_layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, out_dtype: torch.dtype):
    """The ("triton") layer_norm: x [..., N] in any float dtype, weight/bias [N] or None; y in out_dtype."""
    _check(x, "layer_norm")
    return LayerNormFunction.apply(x, weight, bias, eps, out_dtype, True)


def fused_affine(x: Tensor, weight: Tensor | None, bias: Tensor | None, out_dtype: torch.dtype):
    """The ("triton") affine: x * weight + bias over the last dim, the same kernels without the norm."""
    _check(x, "affine")
    return LayerNormFunction.apply(x, weight, bias, 0.0, out_dtype, False)
