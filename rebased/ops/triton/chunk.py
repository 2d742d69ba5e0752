"""Fused chunked linear attention for polynomial kernels: forward and backward Triton kernels.

    sim(q, k) = c0 + c1 s + c2 s^2,  s = scale q.k;   phi(x) = [a0, a1 x, a2 vec(x (x) x)]
    a0 = sqrt(c0), a1 = sqrt(c1 scale), a2 = sqrt(c2) scale      (so phi(q).phi(k) = sim(q, k))

For chunk n of C tokens, with S, z the feature-space state of everything before it:

    num = mask(sim(Q K^T)) V + phi(Q) S,   den = mask(sim(Q K^T)) 1 + phi(Q) z,   o = num / (den + eps)
    S += phi(K)^T V,   z += phi(K)^T 1

One program owns one (batch, head, V block) and walks the chunks in order, the state [F, BV] in
registers. The quadratic features phi2(x) = vec(x (x) x) of a chunk ([C, D^2]) are built in registers
and fed to tensor-core dots against the state; they never reach memory. The state rows are the
feature layout of LinearAttentionState, so initial and final states are read and written as they are.

Backward, with g = do / (den + eps) and dd = -(do . o) / (den + eps) (the normaliser's gradient):
    dA = g V^T + dd 1^T (masked);  dq = (dA * p'(s) scale) K + d/dq [phi(q) . (S g + z dd)]
    dv = A^T g + phi(K) dS;        dk = (dA * p'(s) scale)^T Q + d/dk [phi(k) . (dS v + dz)]
where dS, dz are the state gradients from later chunks (a reverse walk). For a quadratic form
phi2(x) . vec(M), the gradient is (M + M^T) x, done in registers on [C, D, D].

Shape letters: B batch, T time, H heads, C chunk, D q/k dim (BD padded), F feature dim, V value dim.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rows(base, t, c, T, stride, C):
    """x[t, c] for rows t of a [T, stride] view (one head); out of range reads 0."""
    return tl.load(base + t[:, None] * stride + c[None, :], mask=(t[:, None] < T) & (c[None, :] < C), other=0.0)


@triton.jit
def _phi2(x, BT: tl.constexpr, BD: tl.constexpr):
    """vec(x (x) x) per row: [BT, BD] -> [BT, BD * BD], row-major in (i, j), in registers."""
    return tl.reshape(x[:, :, None] * x[:, None, :], [BT, BD * BD])


@triton.jit
def _sym_grad(m, x, BT: tl.constexpr, BD: tl.constexpr):
    """d/dx of phi2(x) . m for m [BT, BD * BD]: (M + M^T) x per row."""
    m3 = tl.reshape(m, [BT, BD, BD])
    return tl.sum(m3 * x[:, None, :], axis=2) + tl.sum(m3 * x[:, :, None], axis=1)


@triton.jit
def _scores(q, k, t, T, scale, c0, c1, c2, PREC: tl.constexpr, HAS0: tl.constexpr, HAS1: tl.constexpr):
    """Masked sim(q, k) and its derivative in q.k (p'(s) scale) for one chunk: two [BT, BT] fp32 tiles."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    a = c2 * s * s
    da = 2.0 * c2 * s
    if HAS1:
        a += c1 * s
        da += c1
    if HAS0:
        a += c0
    keep = (t[:, None] >= t[None, :]) & (t[None, :] < T)
    return tl.where(keep, a, 0.0), tl.where(keep, da * scale, 0.0)


@triton.jit
def _feature_rows(D, BD: tl.constexpr, BD2: tl.constexpr):
    """For the quadratic block: the state row of feature (i, j) = i * D + j, and which (i, j) are real."""
    r2 = tl.arange(0, BD2)
    return (r2 // BD) * D + r2 % BD, ((r2 // BD) < D) & ((r2 % BD) < D)


@triton.jit
def _load_state(s_ptr, z_ptr, pid_bh, cv, z_rows, D, V, F,
                BD: tl.constexpr, BD2: tl.constexpr, BV: tl.constexpr,
                HAS0: tl.constexpr, HAS1: tl.constexpr, HAS2: tl.constexpr):  # fmt: skip
    """One V block of a feature-space state (kv rows [F, V], k_sum [F]), split by feature block.

    k_sum rows at or past z_rows read as 0 (and are not written): a backward program outside V block 0
    passes 0 so that the k_sum gradient is counted once.
    """
    s_base = s_ptr + pid_bh.to(tl.int64) * F * V
    z_base = z_ptr + pid_bh.to(tl.int64) * F
    off1 = 1 if HAS0 else 0
    off2 = off1 + (D if HAS1 else 0)
    d = tl.arange(0, BD)
    mv = cv < V
    row2, m2 = _feature_rows(D, BD, BD2)
    s0 = tl.zeros([BV], tl.float32)
    s1 = tl.zeros([BD, BV], tl.float32)
    s2 = tl.zeros([BD2, BV], tl.float32)
    z0 = tl.zeros([1], tl.float32)
    z1 = tl.zeros([BD], tl.float32)
    z2 = tl.zeros([BD2], tl.float32)
    if HAS0:
        s0 = tl.load(s_base + cv, mask=mv, other=0.0)
        zero = tl.zeros([1], tl.int32)
        z0 = tl.load(z_base + zero, mask=zero < z_rows, other=0.0)
    if HAS1:
        s1 = tl.load(s_base + (off1 + d)[:, None] * V + cv[None, :], mask=(d < D)[:, None] & mv[None, :], other=0.0)
        z1 = tl.load(z_base + off1 + d, mask=(d < D) & ((off1 + d) < z_rows), other=0.0)
    if HAS2:
        s2 = tl.load(s_base + (off2 + row2)[:, None] * V + cv[None, :], mask=m2[:, None] & mv[None, :], other=0.0)
        z2 = tl.load(z_base + off2 + row2, mask=m2 & ((off2 + row2) < z_rows), other=0.0)
    return s0, s1, s2, z0, z1, z2


@triton.jit
def _store_state(s_ptr, z_ptr, pid_bh, cv, z_rows, s0, s1, s2, z0, z1, z2, D, V, F,
                 BD: tl.constexpr, BD2: tl.constexpr,
                 HAS0: tl.constexpr, HAS1: tl.constexpr, HAS2: tl.constexpr):  # fmt: skip
    s_base = s_ptr + pid_bh.to(tl.int64) * F * V
    z_base = z_ptr + pid_bh.to(tl.int64) * F
    off1 = 1 if HAS0 else 0
    off2 = off1 + (D if HAS1 else 0)
    d = tl.arange(0, BD)
    mv = cv < V
    row2, m2 = _feature_rows(D, BD, BD2)
    if HAS0:
        tl.store(s_base + cv, s0, mask=mv)
        zero = tl.zeros([1], tl.int32)
        tl.store(z_base + zero, z0, mask=zero < z_rows)
    if HAS1:
        tl.store(s_base + (off1 + d)[:, None] * V + cv[None, :], s1, mask=(d < D)[:, None] & mv[None, :])
        tl.store(z_base + off1 + d, z1, mask=(d < D) & ((off1 + d) < z_rows))
    if HAS2:
        tl.store(s_base + (off2 + row2)[:, None] * V + cv[None, :], s2, mask=m2[:, None] & mv[None, :])
        tl.store(z_base + off2 + row2, z2, mask=m2 & ((off2 + row2) < z_rows))


@triton.jit
def chunk_fwd_kernel(
    q, k, v, o, den, s_init, z_init, s_final, z_final,
    T, H, D, V, F, scale, c0, c1, c2, a0, a1, a2, eps,
    BT: tl.constexpr, BD: tl.constexpr, BD2: tl.constexpr, BV: tl.constexpr,
    HAS0: tl.constexpr, HAS1: tl.constexpr, HAS2: tl.constexpr,
    USE_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, NORMALIZE: tl.constexpr, CLAMP: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    pid_v, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    qk_base = (b.to(tl.int64) * T * H + h) * D
    v_base = (b.to(tl.int64) * T * H + h) * V
    d = tl.arange(0, BD)
    cv = pid_v * BV + tl.arange(0, BV)
    mv = cv < V
    if USE_INIT:
        s0, s1, s2, z0, z1, z2 = _load_state(s_init, z_init, pid_bh, cv, F, D, V, F, BD, BD2, BV, HAS0, HAS1, HAS2)
    else:
        s0, s1, s2 = tl.zeros([BV], tl.float32), tl.zeros([BD, BV], tl.float32), tl.zeros([BD2, BV], tl.float32)
        z0, z1, z2 = tl.zeros([1], tl.float32), tl.zeros([BD], tl.float32), tl.zeros([BD2], tl.float32)

    for n in range(0, tl.cdiv(T, BT)):
        t = n * BT + tl.arange(0, BT)
        qt = _rows(q + qk_base, t, d, T, H * D, D)
        kt = _rows(k + qk_base, t, d, T, H * D, D)
        vt = _rows(v + v_base, t, cv, T, H * V, V)
        a, _ = _scores(qt, kt, t, T, scale, c0, c1, c2, PREC, HAS0, HAS1)
        num = tl.dot(a.to(vt.dtype), vt, input_precision=PREC)
        dn = tl.sum(a, axis=1)
        qf, kf, vf = qt.to(tl.float32), kt.to(tl.float32), vt.to(tl.float32)
        if HAS0:
            num += a0 * s0[None, :]
            dn += a0 * z0
        if HAS1:
            num += a1 * tl.dot(qf, s1, input_precision=PREC)
            dn += a1 * tl.sum(qf * z1[None, :], axis=1)
        if HAS2:
            pq = _phi2(qf, BT, BD)
            num += a2 * tl.dot(pq, s2, input_precision=PREC)
            dn += a2 * tl.sum(pq * z2[None, :], axis=1)
        if NORMALIZE:
            if CLAMP:  # a sum of non-negative terms: rounding must not push it below zero
                dn = tl.maximum(dn, 0.0)
            num = num / (dn + eps)[:, None]
            tl.store(
                den + (b.to(tl.int64) * T + t) * H + h, dn, mask=(t < T) & (t * 0 + pid_v == 0)
            )  # vector masks only
        tl.store(o + v_base + t[:, None] * (H * V) + cv[None, :], num.to(o.dtype.element_ty),
                 mask=(t[:, None] < T) & mv[None, :])  # fmt: skip
        # the state after this chunk: padded rows load as 0, and the constant feature counts real rows only
        if HAS0:
            s0 += a0 * tl.sum(vf, axis=0)
            z0 += a0 * tl.sum((t < T).to(tl.float32), axis=0)
        if HAS1:
            s1 += a1 * tl.dot(tl.trans(kf), vf, input_precision=PREC)
            z1 += a1 * tl.sum(kf, axis=0)
        if HAS2:
            pk = _phi2(kf, BT, BD)
            s2 += a2 * tl.dot(tl.trans(pk), vf, input_precision=PREC)
            z2 += a2 * tl.sum(pk, axis=0)

    if STORE_FINAL:
        _store_state(s_final, z_final, pid_bh, cv, tl.where(pid_v == 0, F, 0), s0, s1, s2, z0, z1, z2, D, V, F,
                     BD, BD2, HAS0, HAS1, HAS2)  # fmt: skip


@triton.jit
def _out_grads(do_head, den, dd, b, h, t, cv, T, H, V, eps, pid_v, NORMALIZE: tl.constexpr):
    """g = do / (den + eps) [BT, BV] and the normaliser's gradient dd [BT]: one number a token, so it
    belongs to V block 0 and reads as 0 in the others."""
    g = _rows(do_head, t, cv, T, H * V, V).to(tl.float32)
    if NORMALIZE:
        row = (b.to(tl.int64) * T + t) * H + h
        g = g / (tl.load(den + row, mask=t < T, other=1.0) + eps)[:, None]
        gd = tl.load(dd + row, mask=(t < T) & (t * 0 + pid_v == 0), other=0.0)  # vector masks only
    else:
        gd = tl.zeros_like(t).to(tl.float32)
    return g, gd


@triton.jit
def chunk_bwd_kernel(
    q, k, v, do, den, dd, s_init, z_init, ds_final, dz_final, dq, dk, dv, ds_init, dz_init,
    T, H, D, V, F, scale, c0, c1, c2, a0, a1, a2, eps,
    BT: tl.constexpr, BD: tl.constexpr, BD2: tl.constexpr, BV: tl.constexpr,
    HAS0: tl.constexpr, HAS1: tl.constexpr, HAS2: tl.constexpr,
    USE_INIT: tl.constexpr, USE_DFINAL: tl.constexpr, NORMALIZE: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """dq, dk as per-V-block partial sums ([NV, B, T, H, D] fp32, summed by the caller), dv and the
    initial-state gradient complete. Walk 1 (forward in time) rebuilds S, z for dq; walk 2 (backward in
    time) accumulates dS, dz for dk, dv."""
    pid_v, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    qk_base = (b.to(tl.int64) * T * H + h) * D
    part_base = pid_v.to(tl.int64) * (tl.num_programs(1) // H) * T * H * D + qk_base  # [NV, B, T, H, D]
    v_base = (b.to(tl.int64) * T * H + h) * V
    d = tl.arange(0, BD)
    cv = pid_v * BV + tl.arange(0, BV)
    mv = cv < V
    n_chunks = tl.cdiv(T, BT)

    if USE_INIT:
        s0, s1, s2, z0, z1, z2 = _load_state(s_init, z_init, pid_bh, cv, F, D, V, F, BD, BD2, BV, HAS0, HAS1, HAS2)
    else:
        s0, s1, s2 = tl.zeros([BV], tl.float32), tl.zeros([BD, BV], tl.float32), tl.zeros([BD2, BV], tl.float32)
        z0, z1, z2 = tl.zeros([1], tl.float32), tl.zeros([BD], tl.float32), tl.zeros([BD2], tl.float32)
    for n in range(0, n_chunks):
        t = n * BT + tl.arange(0, BT)
        qt = _rows(q + qk_base, t, d, T, H * D, D)
        kt = _rows(k + qk_base, t, d, T, H * D, D)
        vt = _rows(v + v_base, t, cv, T, H * V, V)
        g, gd = _out_grads(do + v_base, den, dd, b, h, t, cv, T, H, V, eps, pid_v, NORMALIZE)
        _, ds = _scores(qt, kt, t, T, scale, c0, c1, c2, PREC, HAS0, HAS1)
        da = tl.dot(g.to(vt.dtype), tl.trans(vt), input_precision=PREC) + gd[:, None]
        dqt = tl.dot((da * ds).to(kt.dtype), kt, input_precision=PREC)
        qf, kf, vf = qt.to(tl.float32), kt.to(tl.float32), vt.to(tl.float32)
        if HAS1:
            dqt += a1 * (tl.dot(g, tl.trans(s1), input_precision=PREC) + gd[:, None] * z1[None, :])
        if HAS2:
            m = tl.dot(g, tl.trans(s2), input_precision=PREC) + gd[:, None] * z2[None, :]
            dqt += a2 * _sym_grad(m, qf, BT, BD)
        tl.store(dq + part_base + t[:, None] * (H * D) + d[None, :], dqt, mask=(t[:, None] < T) & (d[None, :] < D))
        if HAS0:
            s0 += a0 * tl.sum(vf, axis=0)
            z0 += a0 * tl.sum((t < T).to(tl.float32), axis=0)
        if HAS1:
            s1 += a1 * tl.dot(tl.trans(kf), vf, input_precision=PREC)
            z1 += a1 * tl.sum(kf, axis=0)
        if HAS2:
            pk = _phi2(kf, BT, BD)
            s2 += a2 * tl.dot(tl.trans(pk), vf, input_precision=PREC)
            z2 += a2 * tl.sum(pk, axis=0)

    if USE_DFINAL:
        s0, s1, s2, z0, z1, z2 = _load_state(
            ds_final, dz_final, pid_bh, cv, tl.where(pid_v == 0, F, 0), D, V, F, BD, BD2, BV, HAS0, HAS1, HAS2
        )
    else:
        s0, s1, s2 = tl.zeros([BV], tl.float32), tl.zeros([BD, BV], tl.float32), tl.zeros([BD2, BV], tl.float32)
        z0, z1, z2 = tl.zeros([1], tl.float32), tl.zeros([BD], tl.float32), tl.zeros([BD2], tl.float32)
    for i in range(0, n_chunks):  # s*, z* now hold dS, dz: the gradient reaching the state after chunk n
        t = (n_chunks - 1 - i) * BT + tl.arange(0, BT)
        qt = _rows(q + qk_base, t, d, T, H * D, D)
        kt = _rows(k + qk_base, t, d, T, H * D, D)
        vt = _rows(v + v_base, t, cv, T, H * V, V)
        g, gd = _out_grads(do + v_base, den, dd, b, h, t, cv, T, H, V, eps, pid_v, NORMALIZE)
        a, ds = _scores(qt, kt, t, T, scale, c0, c1, c2, PREC, HAS0, HAS1)
        da = tl.dot(g.to(vt.dtype), tl.trans(vt), input_precision=PREC) + gd[:, None]
        dkt = tl.dot(tl.trans((da * ds).to(qt.dtype)), qt, input_precision=PREC)
        dvt = tl.dot(tl.trans(a), g, input_precision=PREC)
        qf, kf, vf = qt.to(tl.float32), kt.to(tl.float32), vt.to(tl.float32)
        if HAS0:
            dvt += a0 * s0[None, :]
        if HAS1:
            dvt += a1 * tl.dot(kf, s1, input_precision=PREC)
            dkt += a1 * (tl.dot(vf, tl.trans(s1), input_precision=PREC) + z1[None, :])
        if HAS2:
            pk = _phi2(kf, BT, BD)
            dvt += a2 * tl.dot(pk, s2, input_precision=PREC)
            w = tl.dot(vf, tl.trans(s2), input_precision=PREC) + z2[None, :]
            dkt += a2 * _sym_grad(w, kf, BT, BD)
        mt = t[:, None] < T
        tl.store(dk + part_base + t[:, None] * (H * D) + d[None, :], dkt, mask=mt & (d[None, :] < D))
        tl.store(dv + v_base + t[:, None] * (H * V) + cv[None, :], dvt.to(dv.dtype.element_ty), mask=mt & mv[None, :])
        if HAS0:
            s0 += a0 * tl.sum(g, axis=0)
            z0 += a0 * tl.sum(gd, axis=0)
        if HAS1:
            s1 += a1 * tl.dot(tl.trans(qf), g, input_precision=PREC)
            z1 += a1 * tl.sum(qf * gd[:, None], axis=0)
        if HAS2:
            pq = _phi2(qf, BT, BD)
            s2 += a2 * tl.dot(tl.trans(pq), g, input_precision=PREC)
            z2 += a2 * tl.sum(pq * gd[:, None], axis=0)
    if USE_INIT:
        _store_state(ds_init, dz_init, pid_bh, cv, tl.where(pid_v == 0, F, 0), s0, s1, s2, z0, z1, z2, D, V, F,
                     BD, BD2, HAS0, HAS1, HAS2)  # fmt: skip
