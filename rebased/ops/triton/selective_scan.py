"""Mamba's selective scan, one program per (sequence, block of channels) walking the time steps with the state in
registers: forward, and one backward pass in reverse time.

    a_t = exp(dt_t A)             h_t = a_t * h_{t-1} + (dt_t x_t) B_t^T          y_t = h_t C_t
    (per channel d and state n: h [Din, N], A [Din, N] < 0, dt_t > 0, x_t [Din], B_t, C_t [N])

Backward, t from T - 1 down to 0, with g the gradient of the loss by h_t (from y_t and, through a_{t+1}, from
later steps; at t = T - 1 the final state's gradient):

    g_t = dy_t C_t^T + a_{t+1} g_{t+1}
    dC_t = sum_d dy_t h_t            dB_t = sum_d g_t (dt_t x_t)            dx_t = dt_t sum_n g_t B_t
    ddt_t = sum_n g_t (x_t B_t + A a_t h_{t-1})                              dA = sum_{b, t} g_t a_t h_{t-1} dt_t
    dh_0 = a_0 g_0

Why a kernel of our own: the torch form (rebased/ops/scan.py's chunked scan, the reference) builds a
[B, Cs, Cs, Din, N] tensor of decays a chunk, about 134 MB a chunk of 16 steps at the MQAR models' micro-batch of
262,144 tokens (Din 128, N 8), and autograd keeps several of them for every chunk. Here the forward writes every
h_t once ([B, T, Din, N] fp32, 1 GiB at that micro-batch) so the backward reads h_{t-1} instead of recomputing it
(walking the recurrence backwards would divide by a_t, which underflows).

The walk is sequential, so a program's speed is its loads' latency: the steps' inputs (dt, x, B, C, and dy in the
backward) load BT steps at a time as [BT, *] tiles, and each step takes its row from registers; the backward's
h_{t-1} loads carry no branch, so the compiler may issue a tile's of them ahead of the steps that use them.

dB and dC sum over channels, which the programs split: each program writes its block's share into fp32 partials
[blocks, B, T, N] that torch sums, as dA's per-sequence partials [B, Din, N]: fixed partitions, the same sums every
run. Math in fp32 whatever the inputs' dtype (y and the states are fp32, as the reference's).

Shape letters: B sequences, T steps, Din channels, N state size; BD channels a program, BN = N padded to a power
of two, BT steps a tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from rebased.ops.triton.launch import interpreting
from rebased.ops.triton.tiles import put_row, step_tile, tile_row

GPU_CHANNELS = 32  # BD: with N 8, a [32, 8] state is 8 fp32 registers a thread of one warp. Not yet timed.
# BT: steps whose per-step inputs load as one tile (1: each step's own loads). Not yet timed; compiled for sm_90a
# 8 fits the backward in 241 registers, 16 spills.
GPU_STEPS = 8
INTERPRETER_CHANNELS, INTERPRETER_STEPS = 8, 4  # small tests cross several channel blocks and step tiles


@triton.jit
def _program(a, Din, N, BD: tl.constexpr, BN: tl.constexpr):
    """This program's sequence and channel block, its channels dd and states nn, the [BD, BN] state offsets and
    mask, and A there (fp32)."""
    seq, block = tl.program_id(0).to(tl.int64), tl.program_id(1)  # int64: h_all passes 2**31 elements at LM sizes
    dd = block * BD + tl.arange(0, BD)
    nn = tl.arange(0, BN)
    state = dd[:, None] * N + nn[None, :]
    inside = (dd[:, None] < Din) & (nn[None, :] < N)
    return seq, block, dd, nn, state, inside, tl.load(a + state, mask=inside, other=0.0).to(tl.float32)


@triton.jit
def selective_scan_fwd_kernel(x, dt, a, b, c, h0, y, h_all, h_last, T, Din, N, BD: tl.constexpr, BN: tl.constexpr,
                              BT: tl.constexpr, SAVE: tl.constexpr):  # fmt: skip
    """y [B, T, Din], every h_t into h_all [B, T, Din, N] (SAVE: for the backward) and the last into h_last. The
    steps' inputs load BT steps at a time, so that one load's latency serves BT steps of the walk."""
    seq, _, dd, nn, state, inside, decay = _program(a, Din, N, BD, BN)
    h = tl.load(h0 + seq * Din * N + state, mask=inside, other=0.0).to(tl.float32)
    row, bc_row = seq * T * Din, seq * T * N
    for t0 in range(0, T, BT):
        steps, at, mask = step_tile(dt, row, t0, T, Din, dd, Din, BT)
        inputs = steps * step_tile(x, row, t0, T, Din, dd, Din, BT)[0]  # dt x
        bs = step_tile(b, bc_row, t0, T, N, nn, N, BT)[0]
        cs = step_tile(c, bc_row, t0, T, N, nn, N, BT)[0]
        outputs = tl.zeros([BT, BD], tl.float32)
        for i in tl.static_range(BT):
            step, u = tile_row(steps, i, BT), tile_row(inputs, i, BT)
            bt, ct = tile_row(bs, i, BT), tile_row(cs, i, BT)
            # a step past T has dt = 0 and x = 0 (masked loads): exp(0) h + 0 leaves h as it is
            h = tl.exp(step[:, None] * decay) * h + u[:, None] * bt[None, :]
            if SAVE:
                tl.store(h_all + (seq * T + t0 + i) * Din * N + state, h, mask=inside & (state * 0 + t0 + i < T))
            outputs = put_row(outputs, i, tl.sum(h * ct[None, :], 1), BT)
        tl.store(y + at, outputs, mask=mask)
    tl.store(h_last + seq * Din * N + state, h, mask=inside)


@triton.jit
def selective_scan_bwd_kernel(x, dt, a, b, c, h0, h_all, dy, dh_last, dx, ddt, da_part, db_part, dc_part, dh0, B, T,
                              Din, N, BD: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr,
                              DLAST: tl.constexpr):  # fmt: skip
    """Reverse time, BT steps a tile from the last: dx, ddt [B, T, Din]; this block's shares of dB, dC (db_part,
    dc_part [blocks, B, T, N]); this sequence's share of dA (da_part [B, Din, N]); dh0 [B, Din, N]. DLAST: the
    final state has a gradient. Each step reads h_{t-1} from h_all; h_t is the previous step's h_{t-1}."""
    seq, block, dd, nn, state, inside, decay = _program(a, Din, N, BD, BN)
    carry = tl.zeros([BD, BN], tl.float32)  # a_{t+1} g_{t+1}
    if DLAST:
        carry = tl.load(dh_last + seq * Din * N + state, mask=inside, other=0.0).to(tl.float32)
    da = tl.zeros([BD, BN], tl.float32)
    row, bc_row = seq * T * Din, seq * T * N
    part = (block * B + seq) * T * N
    ht = tl.load(h_all + (seq * T + T - 1) * Din * N + state, mask=inside & (state * 0 + T > 0), other=0.0)
    first = tl.load(h0 + seq * Din * N + state, mask=inside, other=0.0).to(tl.float32)  # h_{-1}
    tiles = tl.cdiv(T, BT)
    for j in range(0, tiles):
        t0 = (tiles - 1 - j) * BT
        steps, at, mask = step_tile(dt, row, t0, T, Din, dd, Din, BT)
        xs = step_tile(x, row, t0, T, Din, dd, Din, BT)[0]
        gys = step_tile(dy, row, t0, T, Din, dd, Din, BT)[0]
        bs, state_at, state_mask = step_tile(b, bc_row, t0, T, N, nn, N, BT)
        cs = step_tile(c, bc_row, t0, T, N, nn, N, BT)[0]
        dxs = tl.zeros([BT, BD], tl.float32)
        ddts = tl.zeros([BT, BD], tl.float32)
        dbs = tl.zeros([BT, BN], tl.float32)
        dcs = tl.zeros([BT, BN], tl.float32)
        for i in tl.static_range(BT):
            r = BT - 1 - i
            t = t0 + r
            real = t < T  # the last tile's steps past T change nothing
            step, xt, gy = tile_row(steps, r, BT), tile_row(xs, r, BT), tile_row(gys, r, BT)
            bt, ct = tile_row(bs, r, BT), tile_row(cs, r, BT)
            # h_{t-1}: from h_all, or h0 at t = 0, without a branch (a branch would keep the compiler from
            # issuing the tile's loads of h_all ahead of the steps that use them)
            previous = state * 0 + t - 1
            before = tl.load(h_all + (seq * T + t - 1) * Din * N + state,
                             mask=inside & (previous >= 0) & (previous < T - 1), other=0.0)  # fmt: skip
            before = tl.where(previous >= 0, before, first)
            decayed = tl.exp(step[:, None] * decay)
            g = carry + gy[:, None] * ct[None, :]
            dcs = put_row(dcs, r, tl.sum(gy[:, None] * ht, 0), BT)
            dbs = put_row(dbs, r, tl.sum(g * (step * xt)[:, None], 0), BT)
            gb = tl.sum(g * bt[None, :], 1)
            dxs = put_row(dxs, r, step * gb, BT)
            ddts = put_row(ddts, r, xt * gb + tl.sum(g * decay * decayed * before, 1), BT)
            da += g * decayed * before * step[:, None]  # 0 past T: dt is 0 there
            carry = tl.where(real, decayed * g, carry)
            ht = tl.where(real, before, ht)
        tl.store(dx + at, dxs, mask=mask)
        tl.store(ddt + at, ddts, mask=mask)
        tl.store(db_part + part - bc_row + state_at, dbs, mask=state_mask)
        tl.store(dc_part + part - bc_row + state_at, dcs, mask=state_mask)
    tl.store(da_part + seq * Din * N + state, da, mask=inside)
    tl.store(dh0 + seq * Din * N + state, carry, mask=inside)


def _blocks() -> dict:
    """BD and BT: channels a program and steps a tile."""
    if interpreting():
        return {"BD": INTERPRETER_CHANNELS, "BT": INTERPRETER_STEPS}
    return {"BD": GPU_CHANNELS, "BT": GPU_STEPS}


class SelectiveScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor, h0: Tensor):
        (batch, steps, channels), size = x.shape, a.shape[1]
        x, dt, b, c = (t.contiguous() for t in (x, dt, b, c))
        a, h0 = a.float().contiguous(), h0.float().contiguous()
        save = any(ctx.needs_input_grad)
        y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        h_all = torch.empty(batch, steps, channels, size, dtype=torch.float32, device=x.device) if save else y
        h_last = torch.empty_like(h0)
        tiles = _blocks()
        if x.numel():
            selective_scan_fwd_kernel[(batch, triton.cdiv(channels, tiles["BD"]))](
                x, dt, a, b, c, h0, y, h_all, h_last, steps, channels, size, **tiles,
                BN=triton.next_power_of_2(size), SAVE=save, num_warps=1,
            )  # fmt: skip
        else:
            h_last.copy_(h0)
        if save:
            ctx.save_for_backward(x, dt, a, b, c, h0, h_all)
        ctx.dtypes = tuple(t.dtype for t in (x, dt, b, c))
        return y, h_last

    @staticmethod
    def backward(ctx, dy: Tensor | None, dh_last: Tensor | None):
        x, dt, a, b, c, h0, h_all = ctx.saved_tensors
        (batch, steps, channels), size = x.shape, a.shape[1]
        tiles = _blocks()
        blocks = triton.cdiv(channels, tiles["BD"])
        dy = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if dy is None else dy.float().contiguous()
        dx = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        ddt = torch.empty_like(dx)
        # every (sequence, channel block) program writes its rows of the partials at every step: no zeroing then
        allocate = torch.empty if x.numel() else torch.zeros
        da_part = allocate(batch, channels, size, dtype=torch.float32, device=x.device)
        db_part = allocate(blocks, batch, steps, size, dtype=torch.float32, device=x.device)
        dc_part = allocate(blocks, batch, steps, size, dtype=torch.float32, device=x.device)
        dh0 = torch.empty_like(h0)
        if x.numel():
            selective_scan_bwd_kernel[(batch, blocks)](
                x, dt, a, b, c, h0, h_all, dy, dh_last.float().contiguous() if dh_last is not None else dy, dx, ddt,
                da_part, db_part, dc_part, dh0, batch, steps, channels, size, **tiles,
                BN=triton.next_power_of_2(size), DLAST=dh_last is not None, num_warps=1,
            )  # fmt: skip
        else:
            dh0.copy_(dh_last if dh_last is not None else torch.zeros_like(h0))
        x_dtype, dt_dtype, b_dtype, c_dtype = ctx.dtypes
        return (dx.to(x_dtype), ddt.to(dt_dtype), da_part.sum(0), db_part.sum(0).to(b_dtype),
                dc_part.sum(0).to(c_dtype), dh0)  # fmt: skip


def selective_scan(x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
    """The ("triton") selective scan: x, dt [B, T, Din] and b, c [B, T, N] in any float dtype, a [Din, N], h0
    [B, Din, N] -> y [B, T, Din] and the final state [B, Din, N], both fp32; gradients for every input."""
    return SelectiveScanFunction.apply(x, dt, a, b, c, h0)
