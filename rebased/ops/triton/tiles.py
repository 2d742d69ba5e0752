"""The jit tile helpers the parallel, chunk-states and step kernels share.

    sim(q, k) = c0 + c1 s + c2 s^2,  s = scale q.k;   phi(x) = [a0, a1 x, a2 vec(x (x) x)]
    a0 = sqrt(c0), a1 = sqrt(c1 scale), a2 = sqrt(c2) scale      (so phi(q).phi(k) = sim(q, k))

Shape letters: T time, H heads, D q/k dim (BD padded), V value dim.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rows(base, t, c, T, stride, C):
    """x[t, c] as a [len(t), len(c)] tile of a [T, stride] view (one head); out of range reads 0."""
    return tl.load(base + t[:, None] * stride + c[None, :], mask=(t[:, None] < T) & (c[None, :] < C), other=0.0)


@triton.jit
def _scores(q, k, rows, cols, T, scale, c0, c1, c2, PREC: tl.constexpr, HAS0: tl.constexpr, HAS1: tl.constexpr):
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
def _feature_rows(D, BD: tl.constexpr, BD2: tl.constexpr):
    """For the quadratic block: the state row of feature (i, j) = i * D + j, and which (i, j) are real."""
    r2 = tl.arange(0, BD2)
    return (r2 // BD) * D + r2 % BD, ((r2 // BD) < D) & ((r2 % BD) < D)
