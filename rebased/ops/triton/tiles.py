"""The jit tile helpers the parallel, chunk-states and step kernels share; and step_tile, tile_row and put_row,
with which the sequential walks (selective_scan.py, wkv.py) load a tile of steps and step through it in registers.

    sim(q, k) = c0 + c1 s + c2 s^2,  s = scale q.k;   phi(x) = [a0, a1 x, a2 vec(x (x) x)]
    a0 = sqrt(c0), a1 = sqrt(c1 scale), a2 = sqrt(c2) scale      (so phi(q).phi(k) = sim(q, k))

Shape letters: T time, H heads, D q/k dim (BD padded), V value dim.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def step_offsets(base, t0, T, width, cols, n, BT: tl.constexpr):
    """Offsets and mask of steps t0 .. t0 + BT - 1 of a [T, width] slab at base, columns cols: [BT, len(cols)],
    columns past n and steps outside 0 .. T - 1 masked."""
    steps = t0 + tl.arange(0, BT)
    return base + steps[:, None] * width + cols[None, :], ((steps >= 0) & (steps < T))[:, None] & (cols[None, :] < n)


@triton.jit
def step_tile(ptr, base, t0, T, width, cols, n, BT: tl.constexpr):
    """Those steps of ptr as an fp32 tile (0 where masked), with step_offsets' offsets and mask."""
    at, mask = step_offsets(base, t0, T, width, cols, n, BT)
    return tl.load(ptr + at, mask=mask, other=0.0).to(tl.float32), at, mask


@triton.jit
def tile_row(tile, i, BT: tl.constexpr):
    """Row i of a [BT, *] tile: a select and a sum over the rows, which stay in registers where each thread
    holds its column (a one-warp program over a tile's columns)."""
    return tl.sum(tl.where(tl.arange(0, BT)[:, None] == i, tile, 0.0), 0)


@triton.jit
def put_row(tile, i, value, BT: tl.constexpr):
    """The tile with row i replaced by value."""
    return tl.where(tl.arange(0, BT)[:, None] == i, value[None, :], tile)


@triton.jit
def load_tile(base, t, c, T, stride, C):
    """x[t, c] as a [len(t), len(c)] tile of a [T, stride] view (one head); out of range reads 0."""
    return tl.load(base + t[:, None] * stride + c[None, :], mask=(t[:, None] < T) & (c[None, :] < C), other=0.0)


@triton.jit
def masked_scores(q, k, rows, cols, T, scale, c0, c1, c2, PREC: tl.constexpr, HAS0: tl.constexpr,
                  HAS1: tl.constexpr):  # fmt: skip
    """Causally masked sim(q, k) and its derivative in q.k (p'(s) scale) for a tile of query rows x key
    columns: two fp32 tiles."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    a = c2 * s * s
    da = 2.0 * c2 * s
    if HAS1:
        a += c1 * s
        da += c1
    if HAS0:
        a += c0
    keep = (rows[:, None] >= cols[None, :]) & (cols[None, :] < T)
    return tl.where(keep, a, 0.0), tl.where(keep, da * scale, 0.0)


@triton.jit
def query_terms(q, do, r, dd, qk_base, v_base, row_base, rows, cd, cv, T, H, D, V):
    """A block of query rows' backward inputs: q, do (the inputs' dtype) and the fp32 row terms r, dd."""
    qt = load_tile(q + qk_base, rows, cd, T, H * D, D)
    dot = load_tile(do + v_base, rows, cv, T, H * V, V)
    rt = tl.load(r + row_base + rows * H, mask=rows < T, other=0.0)
    ddt = tl.load(dd + row_base + rows * H, mask=rows < T, other=0.0)
    return qt, dot, rt, ddt


@triton.jit
def score_grads(dot, vt, rt, ddt, PREC: tl.constexpr):
    """dA = (do v^T + dd) r for a tile: the do v^T dot takes do and v as they are (exact bf16 products summed
    in fp32) and r scales only afterwards, so do.(v_j - o) cancels exactly where v_j = o (parallel.py's
    docstring says why that matters)."""
    return (tl.dot(dot, tl.trans(vt), input_precision=PREC) + ddt[:, None]) * rt[:, None]


@triton.jit
def square_feature_rows(D, BD: tl.constexpr, BD2: tl.constexpr):
    """For the quadratic block: the state row of feature (i, j) = i * D + j, and which (i, j) are real."""
    r2 = tl.arange(0, BD2)
    return (r2 // BD) * D + r2 % BD, ((r2 // BD) < D) & ((r2 % BD) < D)
