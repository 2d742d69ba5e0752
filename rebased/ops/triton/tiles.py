"""Fused chunked linear attention for polynomial kernels: forward and backward Triton kernels.

    sim(q, k) = c0 + c1 s + c2 s^2,  s = scale q.k;   phi(x) = [a0, a1 x, a2 vec(x (x) x)]
    a0 = sqrt(c0), a1 = sqrt(c1 scale), a2 = sqrt(c2) scale      (so phi(q).phi(k) = sim(q, k))

For chunk n of C tokens, with S, z the feature-space state of everything before it:

    num = mask(sim(Q K^T)) V + phi(Q) S,   den = mask(sim(Q K^T)) 1 + phi(Q) z,   o = num / (den + eps)
    S += phi(K)^T V,   z += phi(K)^T 1

One program owns one (batch, head, V block, segment of the sequence) and walks its chunks in order,
the state [F, BV] in registers. The quadratic features phi2(x) = vec(x (x) x) of a chunk ([C, D^2]) are
built in registers as (x E1) * (x E2), with E1, E2 the 0/1 matrices that pick x_i and x_j for feature
(i, j) (exact, on tensor cores, no reshapes), and fed to tensor-core dots against the state; they never
reach memory. The state rows are the feature layout of LinearAttentionState, so initial and final
states are read and written as they are. Long sequences with few heads are cut into segments so the
GPU has enough programs: chunk_state_kernel sums each segment's phi(K)^T V first, the caller turns
those into each segment's starting state, and the main kernels then run every segment at once.

Backward, with g = do / (den + eps) and dd = -(do . o) / (den + eps) (the normaliser's gradient):
    dA = g V^T + dd 1^T (masked);  dq = (dA * p'(s) scale) K + d/dq [phi(q) . (S g + z dd)]
    dv = A^T g + phi(K) dS;        dk = (dA * p'(s) scale)^T Q + d/dk [phi(k) . (dS v + dz)]
where dS, dz are the state gradients from later chunks (a reverse walk). For a quadratic form
phi2(x) . vec(M), the gradient is (M + M^T) x = (M * (x E2)) E1^T + (M * (x E1)) E2^T. States that
the walk reads as a dot's right operand in both orientations are kept transposed ([BV, F]).

Shape letters: B batch, T time, H heads, C chunk, D q/k dim (BD padded), F feature dim, V value dim.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rows(base, t, c, T, stride, C):
    """x[t, c] as a [len(t), len(c)] tile of a [T, stride] view (one head); out of range reads 0."""
    return tl.load(base + t[:, None] * stride + c[None, :], mask=(t[:, None] < T) & (c[None, :] < C), other=0.0)


@triton.jit
def _cols(base, t, c, T, stride, C):
    """The same tile transposed, [len(c), len(t)], straight from memory."""
    return tl.load(base + t[None, :] * stride + c[:, None], mask=(t[None, :] < T) & (c[:, None] < C), other=0.0)


@triton.jit
def _selectors(BD: tl.constexpr, BD2: tl.constexpr, dtype: tl.constexpr):
    """E1, E2 [BD, BD2] (0/1 in the inputs' dtype, which holds them in half the registers of fp32):
    feature r = (i, j) = (r // BD, r % BD); x E1 = x_i, x E2 = x_j."""
    i = tl.arange(0, BD)[:, None]
    r = tl.arange(0, BD2)[None, :]
    return (r // BD == i).to(dtype), (r % BD == i).to(dtype)


@triton.jit
def _selectors_t(BD: tl.constexpr, BD2: tl.constexpr, dtype: tl.constexpr):
    """E1^T, E2^T [BD2, BD]."""
    r = tl.arange(0, BD2)[:, None]
    i = tl.arange(0, BD)[None, :]
    return (r // BD == i).to(dtype), (r % BD == i).to(dtype)


@triton.jit
def _pick(x, e, PREC: tl.constexpr):
    """x E (or E^T x^T): exact, since E is 0/1 and x keeps its own dtype; fp32 out."""
    return tl.dot(x, e, input_precision=PREC)


@triton.jit
def _pick_t(e_t, x_t, PREC: tl.constexpr):
    return tl.dot(e_t, x_t, input_precision=PREC)


@triton.jit
def _quad_grad(m, x1, x2, e1t, e2t, PREC: tl.constexpr):
    """(M + M^T) x per row from m [BT, BD2] and x1 = x E1, x2 = x E2. The products go to the selectors'
    dtype for the dot: for 16-bit inputs that rounds each term to bf16/fp16 (random, ~0.2%, averaged
    over D^2 terms); fp32 inputs stay fp32."""
    dt = e1t.dtype
    return tl.dot((m * x2).to(dt), e1t, input_precision=PREC) + tl.dot((m * x1).to(dt), e2t, input_precision=PREC)


@triton.jit
def _scores(q, k, rows, cols, T, scale, c0, c1, c2, PREC: tl.constexpr, HAS0: tl.constexpr, HAS1: tl.constexpr):
    """Causally masked sim(q, k) and its derivative in q.k (p'(s) scale) for a tile of query rows x key
    columns (one chunk: rows = cols): two fp32 tiles. Shared with the parallel kernels."""
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


@triton.jit
def _tile_ptrs(base, rows, m_rows, cv, V, TRANS: tl.constexpr):
    """Pointers and mask for state rows x V block: [rows, BV], or [BV, rows] when TRANS."""
    if TRANS:  # one return statement: compiled Triton wants every return to have the same type
        ptr, mask = base + rows[None, :] * V + cv[:, None], m_rows[None, :] & (cv < V)[:, None]
    else:
        ptr, mask = base + rows[:, None] * V + cv[None, :], m_rows[:, None] & (cv < V)[None, :]
    return ptr, mask


@triton.jit
def _zero_state(BD: tl.constexpr, BD2: tl.constexpr, BV: tl.constexpr, TRANS: tl.constexpr):
    z0, z1, z2 = tl.zeros([1], tl.float32), tl.zeros([BD], tl.float32), tl.zeros([BD2], tl.float32)
    if TRANS:  # one return statement: compiled Triton wants every return to have the same type
        s1, s2 = tl.zeros([BV, BD], tl.float32), tl.zeros([BV, BD2], tl.float32)
    else:
        s1, s2 = tl.zeros([BD, BV], tl.float32), tl.zeros([BD2, BV], tl.float32)
    return tl.zeros([BV], tl.float32), s1, s2, z0, z1, z2


@triton.jit
def _load_state(s_ptr, z_ptr, slot, cv, z_rows, D, V, F,
                BD: tl.constexpr, BD2: tl.constexpr, BV: tl.constexpr,
                HAS0: tl.constexpr, HAS1: tl.constexpr, HAS2: tl.constexpr, TRANS: tl.constexpr):  # fmt: skip
    """One V block of a feature-space state (kv rows [F, V], k_sum [F]) at index `slot`, split by feature block.

    k_sum rows at or past z_rows read as 0 (and are not written): a backward program outside V block 0
    passes 0 so that the k_sum gradient is counted once.
    """
    s_base = s_ptr + slot.to(tl.int64) * F * V
    z_base = z_ptr + slot.to(tl.int64) * F
    off1 = 1 if HAS0 else 0
    off2 = off1 + (D if HAS1 else 0)
    d = tl.arange(0, BD)
    row2, m2 = _feature_rows(D, BD, BD2)
    s0, s1, s2, z0, z1, z2 = _zero_state(BD, BD2, BV, TRANS)
    if HAS0:
        s0 = tl.load(s_base + cv, mask=cv < V, other=0.0)
        zero = tl.zeros([1], tl.int32)
        z0 = tl.load(z_base + zero, mask=zero < z_rows, other=0.0)
    if HAS1:
        ptr, mask = _tile_ptrs(s_base, off1 + d, d < D, cv, V, TRANS)
        s1 = tl.load(ptr, mask=mask, other=0.0)
        z1 = tl.load(z_base + off1 + d, mask=(d < D) & ((off1 + d) < z_rows), other=0.0)
    if HAS2:
        ptr, mask = _tile_ptrs(s_base, off2 + row2, m2, cv, V, TRANS)
        s2 = tl.load(ptr, mask=mask, other=0.0)
        z2 = tl.load(z_base + off2 + row2, mask=m2 & ((off2 + row2) < z_rows), other=0.0)
    return s0, s1, s2, z0, z1, z2


@triton.jit
def _store_state(s_ptr, z_ptr, slot, cv, z_rows, s0, s1, s2, z0, z1, z2, D, V, F,
                 BD: tl.constexpr, BD2: tl.constexpr,
                 HAS0: tl.constexpr, HAS1: tl.constexpr, HAS2: tl.constexpr, TRANS: tl.constexpr):  # fmt: skip
    s_base = s_ptr + slot.to(tl.int64) * F * V
    z_base = z_ptr + slot.to(tl.int64) * F
    off1 = 1 if HAS0 else 0
    off2 = off1 + (D if HAS1 else 0)
    d = tl.arange(0, BD)
    row2, m2 = _feature_rows(D, BD, BD2)
    if HAS0:
        tl.store(s_base + cv, s0, mask=cv < V)
        zero = tl.zeros([1], tl.int32)
        tl.store(z_base + zero, z0, mask=zero < z_rows)
    if HAS1:
        ptr, mask = _tile_ptrs(s_base, off1 + d, d < D, cv, V, TRANS)
        tl.store(ptr, s1, mask=mask)
        tl.store(z_base + off1 + d, z1, mask=(d < D) & ((off1 + d) < z_rows))
    if HAS2:
        ptr, mask = _tile_ptrs(s_base, off2 + row2, m2, cv, V, TRANS)
        tl.store(ptr, s2, mask=mask)
        tl.store(z_base + off2 + row2, z2, mask=m2 & ((off2 + row2) < z_rows))


@triton.jit
def _out_grads(do_head, den, dd, b, h, t, cv, T, H, V, eps, pid_v, NORMALIZE: tl.constexpr, TRANS: tl.constexpr):
    """g = do / (den + eps) ([BT, BV], or [BV, BT] when TRANS) and the normaliser's gradient dd [BT]: one
    number a token, so it belongs to V block 0 and reads as 0 in the others."""
    if TRANS:
        g = _cols(do_head, t, cv, T, H * V, V).to(tl.float32)
    else:
        g = _rows(do_head, t, cv, T, H * V, V).to(tl.float32)
    if NORMALIZE:
        row = (b.to(tl.int64) * T + t) * H + h
        r = 1.0 / (tl.load(den + row, mask=t < T, other=1.0) + eps)
        g = g * (r[None, :] if TRANS else r[:, None])
        gd = tl.load(dd + row, mask=(t < T) & (t * 0 + pid_v == 0), other=0.0)  # vector masks only
    else:
        gd = tl.zeros_like(t).to(tl.float32)
    return g, gd


@triton.jit
def chunk_state_kernel(
    x, y, den, dd, s_out, z_out,
    T, H, D, V, F, a0, a1, a2, eps, SEG,
    BT: tl.constexpr, BD: tl.constexpr, BD2: tl.constexpr, BV: tl.constexpr,
    HAS0: tl.constexpr, HAS1: tl.constexpr, HAS2: tl.constexpr, GRAD: tl.constexpr, NORMALIZE: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """One segment's own sums, [F, V] and [F] at slot (b h, segment):
    forward  (GRAD=False): sum phi(k_t) v_t^T and sum phi(k_t)            (x = k, y = v)
    backward (GRAD=True):  sum phi(q_t) g_t^T and sum phi(q_t) dd_t       (x = q, y = do)"""
    pid_v, pid_bh, seg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = pid_bh // H, pid_bh % H
    x_base = (b.to(tl.int64) * T * H + h) * D
    v_base = (b.to(tl.int64) * T * H + h) * V
    d = tl.arange(0, BD)
    cv = pid_v * BV + tl.arange(0, BV)
    e1t, e2t = _selectors_t(BD, BD2, x.dtype.element_ty)
    s0, s1, s2, z0, z1, z2 = _zero_state(BD, BD2, BV, False)
    for n in range(seg * SEG, tl.minimum((seg + 1) * SEG, tl.cdiv(T, BT))):
        t = n * BT + tl.arange(0, BT)
        xt = _cols(x + x_base, t, d, T, H * D, D)  # [BD, BT]
        if GRAD:
            yt, w = _out_grads(y + v_base, den, dd, b, h, t, cv, T, H, V, eps, pid_v, NORMALIZE, False)
        else:
            yt = _rows(y + v_base, t, cv, T, H * V, V).to(tl.float32)
            w = (t < T).to(tl.float32)
        if HAS0:
            s0 += a0 * tl.sum(yt, axis=0)
            z0 += a0 * tl.sum(w, axis=0)
        if HAS1:
            s1 += a1 * tl.dot(xt.to(tl.float32), yt, input_precision=PREC)
            z1 += a1 * tl.sum(xt.to(tl.float32) * w[None, :], axis=1)
        if HAS2:
            px = _pick_t(e1t, xt, PREC) * _pick_t(e2t, xt, PREC)  # phi2(x)^T [BD2, BT]
            s2 += a2 * tl.dot(px, yt, input_precision=PREC)
            z2 += a2 * tl.sum(px * w[None, :], axis=1)
    slot = pid_bh * tl.num_programs(2) + seg
    _store_state(s_out, z_out, slot, cv, tl.where(pid_v == 0, F, 0), s0, s1, s2, z0, z1, z2, D, V, F,
                 BD, BD2, HAS0, HAS1, HAS2, False)  # fmt: skip


@triton.jit
def chunk_fwd_kernel(
    q, k, v, o, den, s_init, z_init, s_final, z_final,
    T, H, D, V, F, scale, c0, c1, c2, a0, a1, a2, eps, SEG,
    BT: tl.constexpr, BD: tl.constexpr, BD2: tl.constexpr, BV: tl.constexpr,
    HAS0: tl.constexpr, HAS1: tl.constexpr, HAS2: tl.constexpr,
    USE_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, NORMALIZE: tl.constexpr, CLAMP: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """Outputs of one segment of SEG chunks, from its starting state (slot b h, segment) in s_init."""
    pid_v, pid_bh, seg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = pid_bh // H, pid_bh % H
    qk_base = (b.to(tl.int64) * T * H + h) * D
    v_base = (b.to(tl.int64) * T * H + h) * V
    d = tl.arange(0, BD)
    cv = pid_v * BV + tl.arange(0, BV)
    mv = cv < V
    slot = pid_bh * tl.num_programs(2) + seg
    if USE_INIT:
        s0, s1, s2, z0, z1, z2 = _load_state(s_init, z_init, slot, cv, F, D, V, F, BD, BD2, BV,
                                             HAS0, HAS1, HAS2, False)  # fmt: skip
    else:
        s0, s1, s2, z0, z1, z2 = _zero_state(BD, BD2, BV, False)
    e1, e2 = _selectors(BD, BD2, q.dtype.element_ty)
    e1t, e2t = _selectors_t(BD, BD2, q.dtype.element_ty)

    for n in range(seg * SEG, tl.minimum((seg + 1) * SEG, tl.cdiv(T, BT))):
        t = n * BT + tl.arange(0, BT)
        qt = _rows(q + qk_base, t, d, T, H * D, D)
        kt = _rows(k + qk_base, t, d, T, H * D, D)
        vt = _rows(v + v_base, t, cv, T, H * V, V)
        a, _ = _scores(qt, kt, t, t, T, scale, c0, c1, c2, PREC, HAS0, HAS1)
        num = tl.dot(a.to(vt.dtype), vt, input_precision=PREC)
        dn = tl.sum(a, axis=1)
        if HAS0:
            num += a0 * s0[None, :]
            dn += a0 * z0
        if HAS1:
            num += a1 * tl.dot(qt.to(tl.float32), s1, input_precision=PREC)
            dn += a1 * tl.sum(qt.to(tl.float32) * z1[None, :], axis=1)
        if HAS2:
            pq = _pick(qt, e1, PREC) * _pick(qt, e2, PREC)  # phi2(q) [BT, BD2]
            num += a2 * tl.dot(pq, s2, input_precision=PREC)
            dn += a2 * tl.sum(pq * z2[None, :], axis=1)
        if NORMALIZE:
            if CLAMP:  # a sum of non-negative terms: rounding must not push it below zero
                dn = tl.maximum(dn, 0.0)
            num = num / (dn + eps)[:, None]
            tl.store(den + (b.to(tl.int64) * T + t) * H + h, dn, mask=(t < T) & (t * 0 + pid_v == 0))
        tl.store(o + v_base + t[:, None] * (H * V) + cv[None, :], num.to(o.dtype.element_ty),
                 mask=(t[:, None] < T) & mv[None, :])  # fmt: skip
        # the state after this chunk: padded rows load as 0, and the constant feature counts real rows only
        if HAS0:
            s0 += a0 * tl.sum(vt.to(tl.float32), axis=0)
            z0 += a0 * tl.sum((t < T).to(tl.float32), axis=0)
        kt_t = _cols(k + qk_base, t, d, T, H * D, D)  # k^T [BD, BT] (a cached re-read)
        if HAS1:
            s1 += a1 * tl.dot(kt_t, vt, input_precision=PREC)
            z1 += a1 * tl.sum(kt_t.to(tl.float32), axis=1)
        if HAS2:
            pk = _pick_t(e1t, kt_t, PREC) * _pick_t(e2t, kt_t, PREC)  # phi2(k)^T [BD2, BT]
            s2 += a2 * tl.dot(pk, vt.to(tl.float32), input_precision=PREC)
            z2 += a2 * tl.sum(pk, axis=1)

    if STORE_FINAL:  # one segment only: several segments' final state is summed by the caller
        _store_state(s_final, z_final, pid_bh, cv, tl.where(pid_v == 0, F, 0), s0, s1, s2, z0, z1, z2, D, V, F,
                     BD, BD2, HAS0, HAS1, HAS2, False)  # fmt: skip


@triton.jit
def chunk_bwd_kernel(
    q, k, v, do, den, dd, s_init, z_init, ds_in, dz_in, dq, dk, dv, ds_init, dz_init,
    T, H, D, V, F, scale, c0, c1, c2, a0, a1, a2, eps, SEG,
    BT: tl.constexpr, BD: tl.constexpr, BD2: tl.constexpr, BV: tl.constexpr,
    HAS0: tl.constexpr, HAS1: tl.constexpr, HAS2: tl.constexpr,
    USE_INIT: tl.constexpr, USE_DS_IN: tl.constexpr, STORE_DINIT: tl.constexpr, NORMALIZE: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """dq, dk as per-V-block partial sums ([NV, B, T, H, D] fp32, summed by the caller); dv complete.
    Walk 1 (forward in time) rebuilds S, z from the segment's start for dq; walk 2 (backward in time)
    accumulates dS, dz from the segment's end (ds_in: what later tokens and the final state send back)."""
    pid_v, pid_bh, seg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = pid_bh // H, pid_bh % H
    qk_base = (b.to(tl.int64) * T * H + h) * D
    part_base = pid_v.to(tl.int64) * (tl.num_programs(1) // H) * T * H * D + qk_base  # [NV, B, T, H, D]
    v_base = (b.to(tl.int64) * T * H + h) * V
    d = tl.arange(0, BD)
    cv = pid_v * BV + tl.arange(0, BV)
    mv = cv < V
    slot = pid_bh * tl.num_programs(2) + seg
    lo, hi = seg * SEG, tl.minimum((seg + 1) * SEG, tl.cdiv(T, BT))
    e1, e2 = _selectors(BD, BD2, q.dtype.element_ty)
    e1t, e2t = _selectors_t(BD, BD2, q.dtype.element_ty)

    if USE_INIT:  # S^T [BV, F]: walk 1 reads it as g S^T
        s0, s1, s2, z0, z1, z2 = _load_state(s_init, z_init, slot, cv, F, D, V, F, BD, BD2, BV,
                                             HAS0, HAS1, HAS2, True)  # fmt: skip
    else:
        s0, s1, s2, z0, z1, z2 = _zero_state(BD, BD2, BV, True)
    for n in range(lo, hi):
        t = n * BT + tl.arange(0, BT)
        qt = _rows(q + qk_base, t, d, T, H * D, D)
        kt = _rows(k + qk_base, t, d, T, H * D, D)
        vt_t = _cols(v + v_base, t, cv, T, H * V, V)  # v^T [BV, BT]
        g, gd = _out_grads(do + v_base, den, dd, b, h, t, cv, T, H, V, eps, pid_v, NORMALIZE, False)
        _, ds = _scores(qt, kt, t, t, T, scale, c0, c1, c2, PREC, HAS0, HAS1)
        da = tl.dot(g.to(vt_t.dtype), vt_t, input_precision=PREC) + gd[:, None]
        dqt = tl.dot((da * ds).to(kt.dtype), kt, input_precision=PREC)
        if HAS1:
            dqt += a1 * (tl.dot(g, s1, input_precision=PREC) + gd[:, None] * z1[None, :])
        if HAS2:
            m = tl.dot(g, s2, input_precision=PREC) + gd[:, None] * z2[None, :]  # [BT, BD2]
            x1, x2 = _pick(qt, e1, PREC), _pick(qt, e2, PREC)
            dqt += a2 * _quad_grad(m, x1, x2, e1t, e2t, PREC)
        tl.store(dq + part_base + t[:, None] * (H * D) + d[None, :], dqt, mask=(t[:, None] < T) & (d[None, :] < D))
        if HAS0:
            s0 += a0 * tl.sum(vt_t.to(tl.float32), axis=1)
            z0 += a0 * tl.sum((t < T).to(tl.float32), axis=0)
        if HAS1:
            s1 += a1 * tl.dot(vt_t, kt, input_precision=PREC)
            z1 += a1 * tl.sum(kt.to(tl.float32), axis=0)
        if HAS2:
            pk = _pick(kt, e1, PREC) * _pick(kt, e2, PREC)
            s2 += a2 * tl.dot(vt_t.to(tl.float32), pk, input_precision=PREC)
            z2 += a2 * tl.sum(pk, axis=0)

    if USE_DS_IN:  # dS^T [BV, F]
        s0, s1, s2, z0, z1, z2 = _load_state(ds_in, dz_in, slot, cv, tl.where(pid_v == 0, F, 0), D, V, F,
                                             BD, BD2, BV, HAS0, HAS1, HAS2, True)  # fmt: skip
    else:
        s0, s1, s2, z0, z1, z2 = _zero_state(BD, BD2, BV, True)
    for i in range(0, hi - lo):
        t = (hi - 1 - i) * BT + tl.arange(0, BT)
        qt = _rows(q + qk_base, t, d, T, H * D, D)
        kt = _rows(k + qk_base, t, d, T, H * D, D)
        kt_t = _cols(k + qk_base, t, d, T, H * D, D)
        vt = _rows(v + v_base, t, cv, T, H * V, V)
        vt_t = _cols(v + v_base, t, cv, T, H * V, V)
        g, gd = _out_grads(do + v_base, den, dd, b, h, t, cv, T, H, V, eps, pid_v, NORMALIZE, False)
        g_t, _ = _out_grads(do + v_base, den, dd, b, h, t, cv, T, H, V, eps, pid_v, NORMALIZE, True)
        a, ds = _scores(qt, kt, t, t, T, scale, c0, c1, c2, PREC, HAS0, HAS1)
        da = tl.dot(g.to(vt_t.dtype), vt_t, input_precision=PREC) + gd[:, None]
        dkt = tl.dot(tl.trans((da * ds).to(qt.dtype)), qt, input_precision=PREC)
        dvt = tl.dot(g_t, a, input_precision=PREC)  # dv^T [BV, BT]
        if HAS0:
            dvt += a0 * s0[:, None]
        if HAS1:
            dvt += a1 * tl.dot(s1, kt_t.to(tl.float32), input_precision=PREC)
            dkt += a1 * (tl.dot(vt.to(tl.float32), s1, input_precision=PREC) + z1[None, :])
        if HAS2:
            dvt += a2 * tl.dot(s2, _pick_t(e1t, kt_t, PREC) * _pick_t(e2t, kt_t, PREC), input_precision=PREC)
            w = tl.dot(vt.to(tl.float32), s2, input_precision=PREC) + z2[None, :]  # [BT, BD2]
            x1, x2 = _pick(kt, e1, PREC), _pick(kt, e2, PREC)
            dkt += a2 * _quad_grad(w, x1, x2, e1t, e2t, PREC)
        tl.store(dk + part_base + t[:, None] * (H * D) + d[None, :], dkt, mask=(t[:, None] < T) & (d[None, :] < D))
        tl.store(dv + v_base + t[None, :] * (H * V) + cv[:, None], dvt.to(dv.dtype.element_ty),
                 mask=(t[None, :] < T) & mv[:, None])  # fmt: skip
        if HAS0:
            s0 += a0 * tl.sum(g, axis=0)
            z0 += a0 * tl.sum(gd, axis=0)
        if HAS1:
            s1 += a1 * tl.dot(g_t, qt.to(tl.float32), input_precision=PREC)
            z1 += a1 * tl.sum(qt.to(tl.float32) * gd[:, None], axis=0)
        if HAS2:
            pq = _pick(qt, e1, PREC) * _pick(qt, e2, PREC)
            s2 += a2 * tl.dot(g_t, pq, input_precision=PREC)
            z2 += a2 * tl.sum(pq * gd[:, None], axis=0)
    if STORE_DINIT:  # one segment only: several segments' initial-state gradient is summed by the caller
        _store_state(ds_init, dz_init, pid_bh, cv, tl.where(pid_v == 0, F, 0), s0, s1, s2, z0, z1, z2, D, V, F,
                     BD, BD2, HAS0, HAS1, HAS2, True)  # fmt: skip
