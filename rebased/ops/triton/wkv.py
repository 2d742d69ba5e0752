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

du and dw sum over sequences and time: each program writes its (sequence, block)'s share into fp32 partials
[B, D] that torch sums, a fixed partition, the same sums every run. The final state carries no gradient.

Shape letters: B sequences, T tokens, D channels; BD channels a program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from rebased.ops.rwkv import EMPTY, WKVState
from rebased.ops.triton.launch import interpreting

GPU_CHANNELS = 32  # BD: one channel a thread of one warp. Not yet timed.
INTERPRETER_CHANNELS = 8  # small tests cross several channel blocks


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
def wkv_fwd_kernel(w, u, k, v, y, top, den, state, B, T, D, empty, BD: tl.constexpr, SAVE: tl.constexpr):
    """y [B, T, D]; top_t and den_t into top, den [B, T, D] (SAVE: for the backward); the final (a, b, p) into
    state [3, B, D]."""
    seq, dd, inside, decay, bonus = _program(w, u, D, BD)
    a = tl.zeros([BD], tl.float32)
    b = tl.zeros([BD], tl.float32)
    p = tl.zeros([BD], tl.float32) + empty
    row = seq * T * D
    for t in range(0, T):
        at = row + t * D + dd
        kt = tl.load(k + at, mask=inside, other=0.0).to(tl.float32)
        vt = tl.load(v + at, mask=inside, other=0.0).to(tl.float32)
        most = tl.maximum(p, bonus + kt)
        old, new = tl.exp(p - most), tl.exp(bonus + kt - most)
        norm = old * b + new
        tl.store(y + at, (old * a + new * vt) / norm, mask=inside)
        if SAVE:
            tl.store(top + at, most, mask=inside)
            tl.store(den + at, norm, mask=inside)
        decayed = p + decay
        p = tl.maximum(decayed, kt)
        old, new = tl.exp(decayed - p), tl.exp(kt - p)
        a = old * a + new * vt
        b = old * b + new
    tl.store(state + seq * D + dd, a, mask=inside)
    tl.store(state + (B + seq) * D + dd, b, mask=inside)
    tl.store(state + (2 * B + seq) * D + dd, p, mask=inside)


@triton.jit
def wkv_bwd_kernel(w, u, k, v, y, top, den, dy, dk, dv, du_part, dw_part, T, D, empty, BD: tl.constexpr):
    """Reverse time: dk, dv [B, T, D] (fp32); this sequence's shares of du and dw (du_part, dw_part [B, D])."""
    seq, dd, inside, decay, bonus = _program(w, u, D, BD)
    q = tl.zeros([BD], tl.float32) + empty
    f = tl.zeros([BD], tl.float32)  # F / e^q
    fy = tl.zeros([BD], tl.float32)  # F' / e^q
    g = tl.zeros([BD], tl.float32)  # G / e^q
    gy = tl.zeros([BD], tl.float32)  # G' / e^q
    du = tl.zeros([BD], tl.float32)
    dw = tl.zeros([BD], tl.float32)
    row = seq * T * D
    for i in range(0, T):
        at = row + (T - 1 - i) * D + dd
        kt = tl.load(k + at, mask=inside, other=0.0).to(tl.float32)
        vt = tl.load(v + at, mask=inside, other=0.0).to(tl.float32)
        yt = tl.load(y + at, mask=inside, other=0.0)
        most = tl.load(top + at, mask=inside, other=0.0)
        c = tl.load(dy + at, mask=inside, other=0.0).to(tl.float32) / tl.load(den + at, mask=inside, other=1.0)
        own = tl.exp(bonus + kt - most) * c
        later = tl.exp(kt + q)
        tl.store(dv + at, own + later * f, mask=inside)
        tl.store(dk + at, own * (vt - yt) + later * (vt * f - fy), mask=inside)
        du += own * (vt - yt)
        dw += later * (vt * g - gy)
        shifted = q + decay
        q = tl.maximum(shifted, -most)
        kept, fresh = tl.exp(shifted - q), tl.exp(-most - q)
        g = kept * (g + f)
        gy = kept * (gy + fy)
        f = kept * f + fresh * c
        fy = kept * fy + fresh * c * yt
    tl.store(du_part + seq * D + dd, du, mask=inside)
    tl.store(dw_part + seq * D + dd, dw, mask=inside)


def _channels() -> int:
    return INTERPRETER_CHANNELS if interpreting() else GPU_CHANNELS


class WKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, u: Tensor, k: Tensor, v: Tensor):
        batch, steps, channels = k.shape
        w, u, k, v = (t.contiguous() for t in (w, u, k, v))
        save = any(ctx.needs_input_grad)
        y = torch.empty(k.shape, dtype=torch.float32, device=k.device)
        top, den = (torch.empty_like(y) for _ in range(2)) if save else (y, y)
        state = torch.empty(3, batch, channels, dtype=torch.float32, device=k.device)
        bd = _channels()
        if batch * channels:
            wkv_fwd_kernel[(batch, triton.cdiv(channels, bd))](
                w, u, k, v, y, top, den, state, batch, steps, channels, EMPTY, BD=bd, SAVE=save, num_warps=1
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
        bd = _channels()
        if batch * channels:
            wkv_bwd_kernel[(batch, triton.cdiv(channels, bd))](
                w, u, k, v, y, top, den, dy, dk, dv, du_part, dw_part, steps, channels, EMPTY, BD=bd, num_warps=1
            )  # fmt: skip
        w_dtype, u_dtype, k_dtype, v_dtype = ctx.dtypes
        return dw_part.sum(0).to(w_dtype), du_part.sum(0).to(u_dtype), dk.to(k_dtype), dv.to(v_dtype)


def wkv(w: Tensor, u: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, WKVState]:
    """The ("triton") WKV from the empty state: w, u [D] and k, v [B, T, D] in any float dtype -> wkv [B, T, D] and
    the final state (a, b, p) [B, D] each, fp32; gradients for w, u, k and v, none through the state."""
    y, state = WKVFunction.apply(w, u, k, v)
    return y, WKVState(*state.unbind(0))
