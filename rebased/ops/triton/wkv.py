"""RWKV-4's WKV, one program per (sequence, block of channels) walking the tokens with the state in registers:
forward, and one backward pass in reverse time. Math in fp32 whatever the inputs' dtype.

Forward (rebased/ops/rwkv.py has the definition), per channel, with the state (a, b, p) of the tokens before t:

    top_t = max(p, u + k_t)          den_t = e^{p - top_t} b + e^{u + k_t - top_t}          (>= 1)
    y_t = (e^{p - top_t} a + e^{u + k_t - top_t} v_t) / den_t
    then (a, b, p) takes token t in:  p' = max(p + w, k_t), a' = e^{p + w - p'} a + e^{k_t - p'} v_t, b' alike.

So the true denominator is D_t = e^{top_t} den_t; the forward keeps top_t and den_t for the backward.

Backward. With g_t the gradient by y_t and c_t = g_t / den_t (so g_t / D_t = e^{-top_t} c_t):

    dv_s = e^{u + k_s - top_s} c_s + e^{k_s} F_s             F_s = sum_{t>s} e^{w (t-1-s) - top_t} c_t
    dk_s = e^{u + k_s - top_s} c_s (v_s - y_s) + e^{k_s} (v_s F_s - F'_s)      F'_s: the same sum of c_t y_t
    du = sum_s e^{u + k_s - top_s} c_s (v_s - y_s)
    dw = sum_s e^{k_s} (v_s G_s - G'_s)                       G_s = sum_{t>s} (t-1-s) e^{w (t-1-s) - top_t} c_t

In reverse time the sums take one token a step: F_{s-1} = e^{-top_s} c_s + e^w F_s, G_{s-1} = e^w (G_s + F_s).
They are kept as e^q times normalised sums, q their own running max (q' = max(q + w, -top_s)), so none of them
overflows; and k_s + w (t-1-s) <= p_t <= top_t for every t > s, so k_s + q <= 0 and e^{k_s + q}, which every
later term is multiplied by, is at most 1.

The walk is sequential in time, so a program's speed is its loads' latency: tokens come in tiles of BT, loaded
at once, and the walk takes their rows from registers (each thread holds its channel's column of a tile); with
PREFETCH the next tile's loads are issued before this tile's walk, which then hides their latency.

du and dw sum over sequences and time: each program writes its (sequence, block)'s share into fp32 partials
[B, D] that torch sums, a fixed partition, the same sums every run. The final state carries no gradient.

Shape letters: B sequences, T tokens, D channels; BD channels a program, BT tokens a tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from rebased.ops.rwkv import EMPTY, WKVState
from rebased.ops.triton.launch import interpreting
from rebased.ops.triton.tiles import put_row, step_offsets, step_tile, tile_row

GPU_CHANNELS = 32  # BD: one channel a thread of one warp. Not yet timed.
GPU_TOKENS = 16  # BT: tokens a tile. Not yet timed.
GPU_PREFETCH = False  # the next tile loaded during this one's walk. Not yet timed.
# Under the interpreter: small tests cross several channel blocks and token tiles; PREFETCH as the tests set it
INTERPRETER_CHANNELS, INTERPRETER_TOKENS, INTERPRETER_PREFETCH = 8, 4, True


@triton.jit
def _program(w, u, D, BD: tl.constexpr):
    """This program's sequence, its channels dd and their mask, and w and u there (fp32)."""
    seq, block = tl.program_id(0).to(tl.int64), tl.program_id(1)  # int64: B T D passes 2**31 at LM sizes
    dd = block * BD + tl.arange(0, BD)
    inside = dd < D
    decay = tl.load(w + dd, mask=inside, other=0.0).to(tl.float32)
    bonus = tl.load(u + dd, mask=inside, other=0.0).to(tl.float32)
    return seq, dd, inside, decay, bonus


@triton.jit
def _forward_tile(k, v, seq, t0, T, D, dd, BT: tl.constexpr):
    """The keys and values of tokens t0 .. t0 + BT - 1 as fp32 [BT, BD] tiles (0 outside 0 .. T - 1)."""
    row = seq * T * D
    return step_tile(k, row, t0, T, D, dd, D, BT)[0], step_tile(v, row, t0, T, D, dd, D, BT)[0]


@triton.jit
def _backward_tile(k, v, y, top, den, dy, seq, t0, T, D, dd, BT: tl.constexpr):
    """What the backward reads of tokens t0 .. t0 + BT - 1: keys, values, outputs, maxima and dy / den (a
    masked den reads 1, so masked rows hold 0, not 0 / 0)."""
    row = seq * T * D
    keys, at, mask = step_tile(k, row, t0, T, D, dd, D, BT)
    values = step_tile(v, row, t0, T, D, dd, D, BT)[0]
    outputs = step_tile(y, row, t0, T, D, dd, D, BT)[0]
    tops = step_tile(top, row, t0, T, D, dd, D, BT)[0]
    scaled = step_tile(dy, row, t0, T, D, dd, D, BT)[0] / tl.load(den + at, mask=mask, other=1.0)
    return keys, values, outputs, tops, scaled


@triton.jit
def wkv_fwd_kernel(w, u, k, v, y, top, den, state, B, T, D, empty, BD: tl.constexpr, BT: tl.constexpr,
                   SAVE: tl.constexpr, PREFETCH: tl.constexpr):  # fmt: skip
    """y [B, T, D]; top_t and den_t into top, den [B, T, D] (SAVE: for the backward); the final (a, b, p) into
    state [3, B, D]. Tokens go in tiles of BT, loaded at once, so that one load's latency serves BT steps of
    the walk; PREFETCH: the next tile is loaded before the walk of this one, so that the walk hides it."""
    seq, dd, inside, decay, bonus = _program(w, u, D, BD)
    a = tl.zeros([BD], tl.float32)
    b = tl.zeros([BD], tl.float32)
    p = tl.zeros([BD], tl.float32) + empty
    if PREFETCH:
        next_keys, next_values = _forward_tile(k, v, seq, 0, T, D, dd, BT)
    for t0 in range(0, T, BT):
        at, mask = step_offsets(seq * T * D, t0, T, D, dd, D, BT)
        if PREFETCH:
            keys, values = next_keys, next_values
            next_keys, next_values = _forward_tile(k, v, seq, t0 + BT, T, D, dd, BT)
        else:
            keys, values = _forward_tile(k, v, seq, t0, T, D, dd, BT)
        outputs = tl.zeros([BT, BD], tl.float32)
        tops = tl.zeros([BT, BD], tl.float32)
        dens = tl.zeros([BT, BD], tl.float32)
        for i in tl.static_range(BT):
            kt, vt = tile_row(keys, i, BT), tile_row(values, i, BT)
            most = tl.maximum(p, bonus + kt)
            old, new = tl.exp(p - most), tl.exp(bonus + kt - most)
            norm = old * b + new
            outputs = put_row(outputs, i, (old * a + new * vt) / norm, BT)
            tops = put_row(tops, i, most, BT)
            dens = put_row(dens, i, norm, BT)
            decayed = p + decay
            after = tl.maximum(decayed, kt)
            old, new = tl.exp(decayed - after), tl.exp(kt - after)
            real = t0 + i < T  # the last tile's rows past T leave the state as it is
            a = tl.where(real, old * a + new * vt, a)
            b = tl.where(real, old * b + new, b)
            p = tl.where(real, after, p)
        tl.store(y + at, outputs, mask=mask)
        if SAVE:
            tl.store(top + at, tops, mask=mask)
            tl.store(den + at, dens, mask=mask)
    tl.store(state + seq * D + dd, a, mask=inside)
    tl.store(state + (B + seq) * D + dd, b, mask=inside)
    tl.store(state + (2 * B + seq) * D + dd, p, mask=inside)


@triton.jit
def wkv_bwd_kernel(w, u, k, v, y, top, den, dy, dk, dv, du_part, dw_part, T, D, empty, BD: tl.constexpr,
                   BT: tl.constexpr, PREFETCH: tl.constexpr):  # fmt: skip
    """Reverse time, in tiles of BT tokens from the last: dk, dv [B, T, D] (fp32); this sequence's shares of du and
    dw (du_part, dw_part [B, D]). PREFETCH as in the forward."""
    seq, dd, inside, decay, bonus = _program(w, u, D, BD)
    q = tl.zeros([BD], tl.float32) + empty
    f = tl.zeros([BD], tl.float32)  # F / e^q
    fy = tl.zeros([BD], tl.float32)  # F' / e^q
    g = tl.zeros([BD], tl.float32)  # G / e^q
    gy = tl.zeros([BD], tl.float32)  # G' / e^q
    du = tl.zeros([BD], tl.float32)
    dw = tl.zeros([BD], tl.float32)
    tiles = tl.cdiv(T, BT)
    if PREFETCH:
        next_k, next_v, next_y, next_top, next_scaled = _backward_tile(k, v, y, top, den, dy, seq, (tiles - 1) * BT,
                                                                       T, D, dd, BT)  # fmt: skip
    for j in range(0, tiles):
        t0 = (tiles - 1 - j) * BT
        at, mask = step_offsets(seq * T * D, t0, T, D, dd, D, BT)
        if PREFETCH:  # then the tile before this one in time (before the first: all masked, nothing read)
            keys, values, outputs, tops, scaled = next_k, next_v, next_y, next_top, next_scaled
            next_k, next_v, next_y, next_top, next_scaled = _backward_tile(k, v, y, top, den, dy, seq, t0 - BT, T, D,
                                                                           dd, BT)  # fmt: skip
        else:
            keys, values, outputs, tops, scaled = _backward_tile(k, v, y, top, den, dy, seq, t0, T, D, dd, BT)
        dks = tl.zeros([BT, BD], tl.float32)
        dvs = tl.zeros([BT, BD], tl.float32)
        for i in tl.static_range(BT):
            r = BT - 1 - i
            kt, vt, yt = tile_row(keys, r, BT), tile_row(values, r, BT), tile_row(outputs, r, BT)
            most, c = tile_row(tops, r, BT), tile_row(scaled, r, BT)
            own = tl.exp(bonus + kt - most) * c
            later = tl.exp(kt + q)
            dvs = put_row(dvs, r, own + later * f, BT)
            dks = put_row(dks, r, own * (vt - yt) + later * (vt * f - fy), BT)
            real = t0 + r < T  # rows past T (the first tile walked back) change no sum
            du = tl.where(real, du + own * (vt - yt), du)
            dw = tl.where(real, dw + later * (vt * g - gy), dw)
            shifted = q + decay
            after = tl.maximum(shifted, -most)
            kept, fresh = tl.exp(shifted - after), tl.exp(-most - after)
            g = tl.where(real, kept * (g + f), g)
            gy = tl.where(real, kept * (gy + fy), gy)
            f = tl.where(real, kept * f + fresh * c, f)
            fy = tl.where(real, kept * fy + fresh * c * yt, fy)
            q = tl.where(real, after, q)
        tl.store(dk + at, dks, mask=mask)
        tl.store(dv + at, dvs, mask=mask)
    tl.store(du_part + seq * D + dd, du, mask=inside)
    tl.store(dw_part + seq * D + dd, dw, mask=inside)


def _blocks() -> dict:
    """BD, BT and PREFETCH: channels a program, tokens a tile, and whether the next tile loads during a walk."""
    if interpreting():
        return {"BD": INTERPRETER_CHANNELS, "BT": INTERPRETER_TOKENS, "PREFETCH": INTERPRETER_PREFETCH}
    return {"BD": GPU_CHANNELS, "BT": GPU_TOKENS, "PREFETCH": GPU_PREFETCH}


class WKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, u: Tensor, k: Tensor, v: Tensor):
        batch, steps, channels = k.shape
        w, u, k, v = (t.contiguous() for t in (w, u, k, v))
        save = any(ctx.needs_input_grad)
        y = torch.empty(k.shape, dtype=torch.float32, device=k.device)
        top, den = (torch.empty_like(y) for _ in range(2)) if save else (y, y)
        state = torch.empty(3, batch, channels, dtype=torch.float32, device=k.device)
        blocks = _blocks()
        if batch * channels:
            wkv_fwd_kernel[(batch, triton.cdiv(channels, blocks["BD"]))](
                w, u, k, v, y, top, den, state, batch, steps, channels, EMPTY, **blocks, SAVE=save, num_warps=1
            )  # fmt: skip
        ctx.mark_non_differentiable(state)
        if save:
            ctx.save_for_backward(w, u, k, v, y, top, den)
        ctx.dtypes = tuple(t.dtype for t in (w, u, k, v))
        return y, state

    @staticmethod
    def backward(ctx, dy: Tensor | None, _dstate: Tensor | None):
        w, u, k, v, y, top, den = ctx.saved_tensors
        batch, steps, channels = k.shape
        dy = torch.zeros_like(y) if dy is None else dy.float().contiguous()
        dk, dv = torch.empty_like(y), torch.empty_like(y)
        du_part = torch.zeros(batch, channels, dtype=torch.float32, device=k.device)
        dw_part = torch.zeros_like(du_part)
        blocks = _blocks()
        if batch * channels:
            wkv_bwd_kernel[(batch, triton.cdiv(channels, blocks["BD"]))](
                w, u, k, v, y, top, den, dy, dk, dv, du_part, dw_part, steps, channels, EMPTY, **blocks, num_warps=1
            )  # fmt: skip
        w_dtype, u_dtype, k_dtype, v_dtype = ctx.dtypes
        return dw_part.sum(0).to(w_dtype), du_part.sum(0).to(u_dtype), dk.to(k_dtype), dv.to(v_dtype)


def wkv(w: Tensor, u: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, WKVState]:
    """The ("triton") WKV from the empty state: w, u [D] and k, v [B, T, D] in any float dtype -> wkv [B, T, D] and
    the final state (a, b, p) [B, D] each, fp32; gradients for w, u, k and v, none through the state."""
    y, state = WKVFunction.apply(w, u, k, v)
    return y, WKVState(*state.unbind(0))
