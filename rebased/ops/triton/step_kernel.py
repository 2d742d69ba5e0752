"""One decoding step for polynomial kernels, updating the feature-space state in place.

    S += phi(k) v^T,   z += phi(k),   o = phi(q) S / (phi(q) z + eps),   phi(x) = [a0, a1 x, a2 vec(x (x) x)]

One program owns one (batch, head): it updates z first (the normaliser needs the new z for every V
block), then walks the V blocks, each read once and written once. The step reads and writes the whole
state, so its floor is the state's bytes (B H F V 4 bytes, twice) over memory bandwidth.

Shape letters: B batch, H heads, D q/k dim (BD padded), F feature dim, V value dim.
"""

from __future__ import annotations

import triton
import triton.language as tl

from rebased.ops.triton.tiles import _feature_rows


@triton.jit
def step_kernel(
    q, k, v, o, kv, k_sum, D, V, F, a0, a1, a2, eps,
    BD: tl.constexpr, BD2: tl.constexpr, BV: tl.constexpr,
    HAS0: tl.constexpr, HAS1: tl.constexpr, HAS2: tl.constexpr, NORMALIZE: tl.constexpr, CLAMP: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BD)
    qv = tl.load(q + bh * D + d, mask=d < D, other=0.0).to(tl.float32)
    kv_ = tl.load(k + bh * D + d, mask=d < D, other=0.0).to(tl.float32)
    row2, m2 = _feature_rows(D, BD, BD2)
    off1 = 1 if HAS0 else 0
    off2 = off1 + (D if HAS1 else 0)
    z_base = k_sum + bh * F
    s_base = kv + bh * F * V

    den = tl.zeros([1], tl.float32)
    if HAS0:
        z0 = tl.load(z_base + tl.zeros([1], tl.int32)) + a0
        tl.store(z_base + tl.zeros([1], tl.int32), z0)
        den += a0 * z0
    if HAS1:
        z1 = tl.load(z_base + off1 + d, mask=d < D, other=0.0) + a1 * kv_
        tl.store(z_base + off1 + d, z1, mask=d < D)
        den += a1 * tl.sum(qv * z1, axis=0)
    if HAS2:
        pq = tl.reshape(qv[:, None] * qv[None, :], [BD2])
        pk = tl.reshape(kv_[:, None] * kv_[None, :], [BD2])
        z2 = tl.load(z_base + off2 + row2, mask=m2, other=0.0) + a2 * pk
        tl.store(z_base + off2 + row2, z2, mask=m2)
        den += a2 * tl.sum(pq * z2, axis=0)
    if CLAMP:
        den = tl.maximum(den, 0.0)

    for start in range(0, V, BV):
        cv = start + tl.arange(0, BV)
        mv = cv < V
        vv = tl.load(v + bh * V + cv, mask=mv, other=0.0).to(tl.float32)
        num = tl.zeros([BV], tl.float32)
        if HAS0:
            s0 = tl.load(s_base + cv, mask=mv, other=0.0) + a0 * vv
            tl.store(s_base + cv, s0, mask=mv)
            num += a0 * s0
        if HAS1:
            ptr1 = s_base + (off1 + d)[:, None] * V + cv[None, :]
            m1 = (d < D)[:, None] & mv[None, :]
            s1 = tl.load(ptr1, mask=m1, other=0.0) + a1 * kv_[:, None] * vv[None, :]
            tl.store(ptr1, s1, mask=m1)
            num += a1 * tl.sum(qv[:, None] * s1, axis=0)
        if HAS2:
            ptr2 = s_base + (off2 + row2)[:, None] * V + cv[None, :]
            mm = m2[:, None] & mv[None, :]
            s2 = tl.load(ptr2, mask=mm, other=0.0) + a2 * pk[:, None] * vv[None, :]
            tl.store(ptr2, s2, mask=mm)
            num += a2 * tl.sum(pq[:, None] * s2, axis=0)
        if NORMALIZE:
            num = num / (den + eps)
        tl.store(o + bh * V + cv, num.to(o.dtype.element_ty), mask=mv)
