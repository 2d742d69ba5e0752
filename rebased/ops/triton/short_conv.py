"""The short causal depthwise convolution in the [B, T, C] layout: forward, and one backward pass for dx, dW and
the bias gradient.

    y[b, t, c] = bias[c] + sum_k W[c, k] x[b, t - (K - 1) + k, c]          (x = 0 before t = 0)
    dx[b, s, c] = sum_k W[c, k] dy[b, s + (K - 1) - k, c]                  (dy = 0 from t = T on)
    dW[c, k] = sum_{b, t} dy[b, t, c] x[b, t - (K - 1) + k, c],   dbias[c] = sum_{b, t} dy[b, t, c]

Why a kernel of our own: torch's Conv1d wants [B, C, T], so the module transposed in and out of it. In a
graphed MQAR step on an H200 the transposes' copies, the strided elementwise ops that followed them, and
torch's three depthwise kernels (forward, input and weight gradients) took about 4 ms of a 36 ms step at L 2048
(benchmarks/results/h200_mqar/mqar_profile_4508870.log). Here x and y stay [B, T, C] and contiguous, each tile
reads its K shifted row windows of x (or dy) once from cache, and the output is written in the dtype the next
op takes. The math is fp32 with fp32 weights, where autocast's Conv1d rounds the weights to bf16 first.

Backward: program p walks the tiles p, p + P, ... of its channel block, writing dx and adding its share of dW and
dbias into fp32 partials [P, K + 1, C] that torch sums: a fixed partition, so the same sums every run.

Shape letters: B sequences, T steps, C channels, K taps; BT steps and BC channels per tile, BK = K padded to a
power of two; P backward programs per channel block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from rebased.ops.triton.launch import interpreting, sm_count

MAX_TAPS = 16  # K: the taps are unrolled into the kernels
# GPU tiles: BT x BC elements a program, NUM_WARPS warps; the backward runs BACKWARD_PROGRAMS_PER_SM programs a
# channel block on each SM. Not yet timed: compiled for sm_90a with 3 taps and bf16 inputs, 64 x 64 with 8 warps
# takes 106 registers forward and 147 backward, no spills; with 4 warps the backward spills (255 and 40 B of stack).
GPU_TILE = (64, 64)
NUM_WARPS = 8
BACKWARD_PROGRAMS_PER_SM = 4
INTERPRETER_TILE = (8, 16)  # small tests cross several time and channel tiles


@triton.jit
def _window(x, seq, rows, shift, channels, T, C):
    """x[seq, rows + shift, channels] as fp32, 0 outside [0, T) x [0, C)."""
    src = rows + shift
    mask = ((src >= 0) & (src < T))[:, None] & (channels < C)[None, :]
    offsets = (seq * T + src).to(tl.int64)[:, None] * C + channels[None, :]
    return tl.load(x + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def short_conv_fwd_kernel(x, w, bias, y, T, C, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BT: tl.constexpr, BC: tl.constexpr):  # fmt: skip
    tile, channel_block, seq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = tile * BT + tl.arange(0, BT)
    channels = channel_block * BC + tl.arange(0, BC)
    acc = tl.zeros([BT, BC], tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias + channels, mask=channels < C, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        tap = tl.load(w + channels * K + k, mask=channels < C, other=0.0).to(tl.float32)
        acc += _window(x, seq, rows, k - (K - 1), channels, T, C) * tap[None, :]
    out = (seq * T + rows).to(tl.int64)[:, None] * C + channels[None, :]
    tl.store(y + out, acc.to(y.dtype.element_ty), mask=(rows < T)[:, None] & (channels < C)[None, :])


@triton.jit
def short_conv_bwd_kernel(x, w, dy, dx, parts, B, T, C, K: tl.constexpr, BK: tl.constexpr,
                          BT: tl.constexpr, BC: tl.constexpr):  # fmt: skip
    """Program (p, channel block): tiles p, p + P, ... of the B x cdiv(T, BT) tiles; its dW and dbias sums go to
    parts[p, :K] and parts[p, K] of the [P, K + 1, C] partials (every program writes its channels' rows)."""
    pid, programs, channel_block = tl.program_id(0), tl.num_programs(0), tl.program_id(1)
    channels = channel_block * BC + tl.arange(0, BC)
    taps = tl.arange(0, BK)
    dw_acc = tl.zeros([BK, BC], tl.float32)
    db_acc = tl.zeros([BC], tl.float32)
    tiles_per_seq = tl.cdiv(T, BT)
    for index in range(pid, B * tiles_per_seq, programs):
        seq, tile = index // tiles_per_seq, index % tiles_per_seq
        rows = tile * BT + tl.arange(0, BT)
        dy_here = _window(dy, seq, rows, 0, channels, T, C)
        db_acc += tl.sum(dy_here, axis=0)
        grad = tl.zeros([BT, BC], tl.float32)
        for k in tl.static_range(K):
            tap = tl.load(w + channels * K + k, mask=channels < C, other=0.0).to(tl.float32)
            grad += _window(dy, seq, rows, (K - 1) - k, channels, T, C) * tap[None, :]
            per_channel = tl.sum(dy_here * _window(x, seq, rows, k - (K - 1), channels, T, C), axis=0)
            dw_acc += tl.where(taps[:, None] == k, per_channel[None, :], 0.0)
        out = (seq * T + rows).to(tl.int64)[:, None] * C + channels[None, :]
        tl.store(dx + out, grad.to(dx.dtype.element_ty), mask=(rows < T)[:, None] & (channels < C)[None, :])
    ok = channels < C
    part = parts + pid * (K + 1) * C
    tl.store(part + taps[:, None] * C + channels[None, :], dw_acc, mask=(taps < K)[:, None] & ok[None, :])
    tl.store(part + K * C + channels, db_acc, mask=ok)


def _tile() -> tuple[int, int]:
    return INTERPRETER_TILE if interpreting() else GPU_TILE


def _backward_programs(tiles: int, channel_blocks: int, device: torch.device) -> int:
    if interpreting():
        return min(tiles, 3)
    return max(1, min(tiles, BACKWARD_PROGRAMS_PER_SM * sm_count(device) // channel_blocks))


class ShortConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
        (batch, steps, channels), taps = x.shape, weight.shape[-1]
        x = x.contiguous()
        w = weight.reshape(channels, taps).contiguous()
        y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        bt, bc = _tile()
        if x.numel():
            short_conv_fwd_kernel[(triton.cdiv(steps, bt), triton.cdiv(channels, bc), batch)](
                x, w, bias if bias is not None else w, y, steps, channels, K=taps, HAS_BIAS=bias is not None,
                BT=bt, BC=bc, num_warps=NUM_WARPS,
            )  # fmt: skip
        ctx.save_for_backward(x, w)
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, w = ctx.saved_tensors
        (batch, steps, channels), taps = x.shape, w.shape[1]
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        bt, bc = _tile()
        channel_blocks = triton.cdiv(channels, bc)
        programs = _backward_programs(batch * triton.cdiv(steps, bt), channel_blocks, x.device) if x.numel() else 0
        # dW's and dbias's partials in one buffer and one sum, left unset: the kernel writes every row (with no
        # programs the sum over none is zeros)
        parts = torch.empty(programs, taps + 1, channels, dtype=torch.float32, device=x.device)
        if programs:
            short_conv_bwd_kernel[(programs, channel_blocks)](
                x, w, dy, dx, parts, batch, steps, channels, K=taps, BK=triton.next_power_of_2(taps),
                BT=bt, BC=bc, num_warps=NUM_WARPS,
            )  # fmt: skip
        sums = parts.sum(0)
        dw = sums[:taps].t().reshape(ctx.weight_shape).to(ctx.weight_dtype)
        db = None if ctx.bias_dtype is None else sums[taps].to(ctx.bias_dtype)
        return dx, dw, db, None


def short_conv(x: Tensor, weight: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """The ("triton") short_conv: x [B, T, C] in any float dtype, weight [C, 1, K] (Conv1d's) or [C, K], bias [C]
    or None; y [B, T, C] in out_dtype."""
    if x.dim() != 3 or weight.shape[0] != x.shape[2] or weight.numel() != x.shape[2] * weight.shape[-1]:
        raise ValueError(f"short_conv: x [B, T, C] and weight [C, 1, K], got {tuple(x.shape)}, {tuple(weight.shape)}")
    if weight.shape[-1] > MAX_TAPS:
        raise NotImplementedError(f"short_conv(backend='triton') covers up to {MAX_TAPS} taps, got {weight.shape[-1]}")
    return ShortConvFunction.apply(x, weight, bias, out_dtype)
