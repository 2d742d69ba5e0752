"""Fused chunked linear attention for small heads: one program walks a whole sequence with its state on chip.

For the shapes of the MQAR models: many (sequence, head) pairs, q/k dim 16, value dims 1-16 (d_model 64-128
over 12 heads gives 5-11). There the feature-space state of one (sequence, head) is tiny (256 square features x
8 values, 8 KB fp32), so it stays in registers while one program walks the sequence's chunks: no chunk states
in memory, no scan, one launch per pass. chunk_states.py is the better form where there are few (sequence,
head) pairs to spread over the GPU, or wide heads (its programs take one chunk each); the ("chunk", "triton")
pair picks between them (chunk_dispatch.py).

The state is kept in feature space, so it is the op contract's state up to layout. With a0, a1, a2 phi's
coefficients (phi(x) = [a0, a1 x, a2 vec(x (x) x)], inputs.PolynomialArgs) and the square part laid out
[i, (j, v)] rather than [(i, j), v]:

    S2[i, (j, v)] = a2 sum_s k_si k_sj v_sv   Z2[i, j] = a2 sum_s k_si k_sj     (square term)
    S1[i, v] = a1 sum_s k_si v_sv             z1[i] = a1 sum_s k_si             (linear term)
    s0[v] = a0 sum_s v_sv                     z0 = a0 (tokens so far)           (constant term)

Queries read it without building phi's 256 features: with u = q S2 (one [C, BD] x [BD, BD BV] dot),

    num = a2 sum_j q_j u[(j, v)] + a1 q S1 + a0 s0         den = a2 q^T Z2 q + a1 q . z1 + a0 z0

and a chunk's keys add a2 K^T (K (x) V) to S2, with (K (x) V)[t, (j, v)] = k_tj v_tv built in registers (a
[C, BD, BV] product reshaped to 2D; FusedLaunch.flat gathers it from memory instead, keeping every tile 2D). The
value dim is the inner part of the state's columns, so a value dim of 5 pads to 8 (BV), not to a dot's 16: at
V 5 the state's dots are half the size of phi(q) [C, 256] x S [256, 16]. Value dims up to 4 (the kernel
ablation's 1, 2 and 4) pad only to their power of two: BF = 16 BV is still a dot's side, and the few dots whose
N is BV itself (p v, the linear term's) become products and sums below 8, the tensor cores' narrowest N. The
intra-chunk part is the parallel kernel's score tile on the chunk's own [C, C] square (tiles.masked_scores);
o = num / (den + eps) as everywhere.

Tiles and warps: Triton gives every dot in the chunk loop the warp layout of one of them ([warps, 1] when dots
chain), so each dot here has its long side first: M is the chunk (query or key rows, C = 16 x warps fills it) or
BF, which is why the kernels hold the square state transposed, S2^T [BF, BD]. A [16, *] result would be
computed by every warp alike. The [C, BF] tiles (u = q S2, K (x) V, Q (x) G) are what fills the registers:
BF / 2 fp32 a thread at C = 16 x warps, 64 at V <= 8, so V up to 16 is where these kernels are meant to run
(wider value dims work but spill; chunk_dispatch.py routes them to chunk_states.py).

The square state is symmetric in (i, j) (k_i k_j is), which the backward uses: d(q^T S2 q)/dq = 2 S2 q. An
initial state need not be symmetric (the contract allows any), but the queries only see its symmetric part,
so the host passes that in and adds the rest to the final state; the final state's gradient is symmetrised
the same way (`_symmetric_square`). Backward, with g = do r, e = dd r (r = 1 / (den + eps), dd = -(do . o):
parallel.py says why those terms are kept exact), two passes, each with its state on chip and recomputing
rather than storing:

    dq pass   (forward in time, the state before each chunk)
              dq = intra + 2 a2 (Q (x) G) S2^T + 2 a2 e Z2 q + a1 G S1^T + a1 e z1
    dkdv pass (backward in time; dS: what later chunks' queries and the final state send back)
              dv = intra + a2 sum_j k_j (k dS2)[(j, v)] + a1 k dS1 + a0 ds0
              dk = intra + 2 a2 (K (x) V) dS2^T + 2 a2 k dZ2 + a1 V dS1^T + a1 dz1
              then dS2 += a2 Q^T (Q (x) G), dZ2 += a2 Q^T (e Q), dS1 += a1 Q^T G, ...

Each pass computes r and dd itself from do, the fp32 o and den. The dkdv pass ends with the initial state's
gradient.

Programs: one per (sequence, head), heads of a sequence side by side, longest sequences first; a dense batch is B
sequences of T (sequences.py), so cu_seqlens costs nothing extra. GPU_LAUNCHES says how each kernel is launched
and where those choices were measured. Shape letters: C chunk, BD padded q/k dim (16 or 32), BV padded value dim
(a power of two), BF = BD BV the square state's columns, BVK = max(16, BV) (a dot contracting over values
needs K >= 16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from rebased.ops.common import LinearAttentionState
from rebased.ops.kernels import Polynomial
from rebased.ops.triton.inputs import PolynomialArgs, check_dtype_and_device, wants_gradients
from rebased.ops.triton.launch import dot_precision, interpreting
from rebased.ops.triton.sequences import Sequences, cached_when_dense
from rebased.ops.triton.tiles import load_tile, masked_scores, score_grads

# ---- jit pieces ---------------------------------------------------------------------------------------------


@triton.jit
def _program(seqs, H):
    """This program's (sequence start, length, state row n) from the seqs table, and its head: programs are
    (sequence, head) pairs, heads fastest, so neighbours read the same tokens' rows."""
    pid = tl.program_id(0)
    row = seqs + (pid // H) * 3
    return tl.load(row).to(tl.int64), tl.load(row + 1), tl.load(row + 2).to(tl.int64), pid % H


@triton.jit
def _spread(x, t, cf, T, stride, n, BV: tl.constexpr, OUTER: tl.constexpr):
    """Rows t of x as [len(t), BF] in the square state's column order (j, v): x[t, j] (OUTER) or x[t, v] (inner):
    a gather of repeated addresses (cached). Columns past n and rows past T read 0."""
    return load_tile(x, t, cf // BV if OUTER else cf % BV, T, stride, n)


@triton.jit
def _spread_t(x, t, cf, T, stride, n, BV: tl.constexpr, OUTER: tl.constexpr):
    """_spread transposed: [BF, len(t)]."""
    c = cf // BV if OUTER else cf % BV
    return tl.load(x + t[None, :] * stride + c[:, None], mask=(t[None, :] < T) & (c[:, None] < n), other=0.0)


@triton.jit
def _outer(x, y, scale, xp, yp, t, T, XS, YS, NX, NY, R: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
           FLAT: tl.constexpr):  # fmt: skip
    """[r, (j, v)] = scale_r x[r, j] y[r, v] (K (x) V, Q (x) G; fp32), from the register tiles x [R, BD] and
    y [R, BV] as a 3D product reshaped to 2D; FLAT: from gathers of the same rows in memory (xp, yp: row 0,
    XS, YS their strides, NX, NY their columns), every tile 2D (register-hungry: a pointer an element)."""
    if FLAT:
        cf = tl.arange(0, BD * BV)
        xg = _spread(xp, t, cf, T, XS, NX, BV, True).to(tl.float32)
        return xg * (_spread(yp, t, cf, T, YS, NY, BV, False).to(tl.float32) * scale[:, None])
    y = y.to(tl.float32) * scale[:, None]
    return tl.reshape(x.to(tl.float32)[:, :, None] * y[:, None, :], (R, BD * BV))


@triton.jit
def _outer_t(x, y, scale, xp, yp, t, T, XS, YS, NX, NY, R: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
             FLAT: tl.constexpr):  # fmt: skip
    """_outer transposed, [(j, v), r]: the A operand of the dots that add a chunk to the square state (M = BF)."""
    if FLAT:
        cf = tl.arange(0, BD * BV)
        xg = _spread_t(xp, t, cf, T, XS, NX, BV, True).to(tl.float32)
        return xg * (_spread_t(yp, t, cf, T, YS, NY, BV, False).to(tl.float32) * scale[None, :])
    y = tl.trans(y.to(tl.float32) * scale[:, None])
    return tl.reshape(tl.trans(x).to(tl.float32)[:, None, :] * y[None, :, :], (BD * BV, R))


@triton.jit
def _weighted_sum_over_j(u, x, xp, t, T, XS, NX, R: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
                         FLAT: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """sum_j x[r, j] u[r, (j, v)] -> [R, BV] for u [R, BF] (fp32) and x [R, BD]: u as [R, BD, BV] times
    x[:, :, None], summed (exact). FLAT: x gathered over the columns times u, then a dot with a 0/1 [BF, BV]
    matrix (2D; the product rounds to PREC)."""
    if FLAT:
        cf = tl.arange(0, BD * BV)
        pick = ((cf[:, None] % BV) == tl.arange(0, BV)[None, :]).to(tl.float32)
        xg = _spread(xp, t, cf, T, XS, NX, BV, True).to(tl.float32)
        return _dot_values(xg * u, pick, BV, PREC)
    return tl.sum(tl.reshape(u, (R, BD, BV)) * x.to(tl.float32)[:, :, None], 1)


@triton.jit
def _contract_values(a, b, BV: tl.constexpr, PREC: tl.constexpr):
    """a [R, BV] x b [M, BV]^T -> [R, M], fp32: a dot where BV can be a dot's K (>= 16), else a product and a
    sum (the linear term's two uses, small)."""
    if BV >= 16:
        return tl.dot(a, tl.trans(b), input_precision=PREC)
    return tl.sum(a[:, None, :] * b[None, :, :], 2)


@triton.jit
def _dot_values(a, b, BV: tl.constexpr, PREC: tl.constexpr):
    """a [M, K] x b [K, BV] -> [M, BV], fp32: a dot from BV 8 (the tensor cores' narrowest N), else a product
    and a sum (the ablation's value dims 1-4, where padding to 8 would double to octuple the state)."""
    if BV >= 8:
        return tl.dot(a, b, input_precision=PREC)
    return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], 1)


@triton.jit
def _state_dot(a, b, acc, like, LOW: tl.constexpr, PREC: tl.constexpr):
    """acc + a [M, K] x b [K, N], one of a, b fp32 state-sized: with LOW both as the 16-bit type of `like` (the
    inputs'; the tensor cores' fast path, the fp32 operand rounds to 8 or 11 bits), else both fp32 at PREC."""
    if LOW:
        return tl.dot(a.to(like.dtype), b.to(like.dtype), acc, input_precision=PREC)
    return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PREC)


@triton.jit
def _state_offsets(BD: tl.constexpr, BV: tl.constexpr):
    """Where each part of one (sequence, head)'s packed state starts: S2 [BD, BF], Z2 [BD, BD], S1 [BD, BV],
    z1 [BD], s0 [BV], z0 (state_size() is the total)."""
    z2 = BD * BD * BV
    s1 = z2 + BD * BD
    z1 = s1 + BD * BV
    s0 = z1 + BD
    return z2, s1, z1, s0, s0 + BV


@triton.jit
def _state_row(n, h, H, BD: tl.constexpr, BV: tl.constexpr):
    """Where (sequence row n, head h)'s packed state starts: rows of state_size() floats, heads side by side."""
    z2, s1, z1, s0, z0 = _state_offsets(BD, BV)
    return (n * H + h) * (z0 + 1)


@triton.jit
def _load_state(ptr, base, BD: tl.constexpr, BV: tl.constexpr):
    """One (sequence, head)'s packed state; the square part transposed, as the kernels hold it: [BF, BD]."""
    cd, cv, cf = tl.arange(0, BD), tl.arange(0, BV), tl.arange(0, BD * BV)
    o_z2, o_s1, o_z1, o_s0, o_z0 = _state_offsets(BD, BV)
    s2t = tl.load(ptr + base + cd[None, :] * (BD * BV) + cf[:, None])
    z2 = tl.load(ptr + base + o_z2 + cd[:, None] * BD + cd[None, :])
    s1 = tl.load(ptr + base + o_s1 + cd[:, None] * BV + cv[None, :])
    return s2t, z2, s1, tl.load(ptr + base + o_z1 + cd), tl.load(ptr + base + o_s0 + cv), tl.load(ptr + base + o_z0)


@triton.jit
def _store_state(ptr, base, s2t, z2, s1, z1, s0, z0, BD: tl.constexpr, BV: tl.constexpr):
    cd, cv, cf = tl.arange(0, BD), tl.arange(0, BV), tl.arange(0, BD * BV)
    o_z2, o_s1, o_z1, o_s0, o_z0 = _state_offsets(BD, BV)
    tl.store(ptr + base + cd[None, :] * (BD * BV) + cf[:, None], s2t)
    tl.store(ptr + base + o_z2 + cd[:, None] * BD + cd[None, :], z2)
    tl.store(ptr + base + o_s1 + cd[:, None] * BV + cv[None, :], s1)
    tl.store(ptr + base + o_z1 + cd, z1)
    tl.store(ptr + base + o_s0 + cv, s0)
    tl.store(ptr + base + o_z0, z0)


@triton.jit
def _start_state(ptr, base, GIVEN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr):
    """The packed state at ptr (GIVEN), else zeros: S2^T, Z2, S1, z1, s0, z0 in fp32."""
    if GIVEN:
        return _load_state(ptr, base, BD, BV)
    zero = tl.zeros([BD], tl.float32)
    return (tl.zeros([BD * BV, BD], tl.float32), tl.zeros([BD, BD], tl.float32), tl.zeros([BD, BV], tl.float32),
            zero, tl.zeros([BV], tl.float32), tl.sum(zero, 0))  # fmt: skip


@triton.jit
def _add_keys(k, v, t, kt, vt, T, s2t, z2, s1, z1, s0, z0, H, D, V, a0, a1, a2, C: tl.constexpr, BD: tl.constexpr,
              BV: tl.constexpr, HAS0: tl.constexpr, HAS1: tl.constexpr, HAS2: tl.constexpr, FLAT: tl.constexpr,
              LOW: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """The state after rows t of keys kt [C, BD] and values vt [C, BV] (rows past T read 0); k, v point at this
    (sequence, head)'s row 0."""
    if HAS2:
        kv = _outer_t(kt, vt, tl.full([C], a2, tl.float32), k, v, t, T, H * D, H * V, D, V, C, BD, BV, FLAT)
        s2t = _state_dot(kv, kt, s2t, kt, LOW, PREC)  # + a2 (K (x) V)^T K
        z2 += a2 * tl.dot(tl.trans(kt), kt, input_precision=PREC)
    if HAS1:
        s1 += a1 * _dot_values(tl.trans(kt), vt, BV, PREC)
        z1 += a1 * tl.sum(kt.to(tl.float32), 0)
    if HAS0:
        s0 += a0 * tl.sum(vt.to(tl.float32), 0)
        z0 += a0 * tl.sum((t < T).to(tl.float32), 0)
    return s2t, z2, s1, z1, s0, z0


@triton.jit
def _read_state(q, t, qt, T, s2t, z2, s1, z1, s0, z0, H, D, a0, a1, a2, C: tl.constexpr, BD: tl.constexpr,
                BV: tl.constexpr, HAS0: tl.constexpr, HAS1: tl.constexpr, HAS2: tl.constexpr, FLAT: tl.constexpr,
                LOW: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """phi(q)^T S and phi(q)^T z for query rows t (qt [C, BD]): [C, BV] and [C], fp32."""
    qf = qt.to(tl.float32)
    num = tl.zeros([C, BV], tl.float32)
    den = tl.zeros([C], tl.float32)
    if HAS2:
        u = _state_dot(qt, tl.trans(s2t), tl.zeros([C, BD * BV], tl.float32), qt, LOW, PREC)  # q S2: [C, BF]
        num += a2 * _weighted_sum_over_j(u, qt, q, t, T, H * D, D, C, BD, BV, FLAT, PREC)
        den += a2 * tl.sum(tl.dot(qf, z2, input_precision=PREC) * qf, 1)
    if HAS1:
        num += a1 * _dot_values(qf, s1, BV, PREC)
        den += a1 * tl.sum(qf * z1[None, :], 1)
    if HAS0:
        num += a0 * s0[None, :]
        den += a0 * z0
    return num, den


@triton.jit
def _row_terms(o32, den, t, T, dot, v_base, row_base, H, V, eps, BV: tl.constexpr, NORMALIZE: tl.constexpr,
               CLAMP: tl.constexpr):  # fmt: skip
    """r = 1 / (den + eps) and dd = -(do . o) for rows t (0 past T), from do [C, BV] and the fp32 o: parallel.py's
    row terms, computed where they are used. Without normalisation r = 1, dd = 0; a clamped den below 0 has dd 0."""
    valid = t < T
    if NORMALIZE:
        o = load_tile(o32 + v_base, t, tl.arange(0, BV), T, H * V, V)
        dd = -tl.sum(dot.to(tl.float32) * o, 1)
        dn = tl.load(den + row_base + t * H, mask=valid, other=1.0)
        if CLAMP:
            dd = tl.where(dn < 0, 0.0, dd)
            dn = tl.maximum(dn, 0.0)
        return tl.where(valid, 1.0 / (dn + eps), 0.0), dd
    return valid.to(tl.float32), tl.zeros_like(valid.to(tl.float32))


@triton.jit
def _bases(start, h, H, D, V):
    """Offsets of (start, h) in q/k [tokens, H, D], in v/o [tokens, H, V] and in per-row [tokens, H]."""
    return (start * H + h) * D, (start * H + h) * V, start * H + h


@triton.jit
def _score_grads(q, k, v, do, t, qt, kt, r, dd, qk_base, v_base, T, H, D, V, scale, c0, c1, c2, BVK: tl.constexpr,
                 HAS0: tl.constexpr, HAS1: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """The chunk's own [queries, keys] tiles for the backward: p, p'(s) scale and dA = (do v^T + dd) r (tiles.py;
    do and v re-read BVK wide: the dot contracts the value dim, and a dot's K is at least 16)."""
    p, dp = masked_scores(qt, kt, t, t, T, scale, c0, c1, c2, PREC, HAS0, HAS1)
    ck = tl.arange(0, BVK)
    do_k = load_tile(do + v_base, t, ck, T, H * V, V)
    return p, dp, score_grads(do_k, load_tile(v + v_base, t, ck, T, H * V, V), r, dd, PREC)


# ---- kernels -------------------------------------------------------------------------------------------------


@triton.jit
def fused_chunk_fwd_kernel(q, k, v, o, o32, den, state0, state, seqs, H, D, V, scale, c0, c1, c2, a0, a1, a2, eps,
                           C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, HAS0: tl.constexpr,
                           HAS1: tl.constexpr, HAS2: tl.constexpr, INIT: tl.constexpr, FINAL: tl.constexpr,
                           NORMALIZE: tl.constexpr, CLAMP: tl.constexpr, SAVE32: tl.constexpr, FLAT: tl.constexpr,
                           LOW: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr):  # fmt: skip
    """o (and its fp32 copy with SAVE32, and den) for one (sequence, head), chunk by chunk: the chunk's own
    quadratic part plus what the state before it gives; then the chunk's keys join the state. INIT: start from
    state0's packed row; FINAL: write the last state to state's."""
    start, T, n, h = _program(seqs, H)
    qk_base, v_base, row_base = _bases(start, h, H, D, V)
    row = _state_row(n, h, H, BD, BV)
    s2t, z2, s1, z1, s0, z0 = _start_state(state0, row, INIT, BD, BV)
    cd, cv = tl.arange(0, BD), tl.arange(0, BV)
    for c in tl.range(0, tl.cdiv(T, C), num_stages=STAGES):
        t = c * C + tl.arange(0, C)
        qt = load_tile(q + qk_base, t, cd, T, H * D, D)
        kt = load_tile(k + qk_base, t, cd, T, H * D, D)
        vt = load_tile(v + v_base, t, cv, T, H * V, V)
        p, _ = masked_scores(qt, kt, t, t, T, scale, c0, c1, c2, PREC, HAS0, HAS1)
        p = p.to(vt.dtype)  # the normaliser sums the same rounded scores (parallel.py says why)
        num, dn = _read_state(q + qk_base, t, qt, T, s2t, z2, s1, z1, s0, z0, H, D, a0, a1, a2, C, BD, BV, HAS0, HAS1,
                              HAS2, FLAT, LOW, PREC)  # fmt: skip
        num += _dot_values(p, vt, BV, PREC)
        dn += tl.sum(p.to(tl.float32), 1)
        offsets = v_base + t[:, None] * (H * V) + cv[None, :]
        mask = (t[:, None] < T) & (cv[None, :] < V)
        if NORMALIZE:
            num = num / ((tl.maximum(dn, 0.0) if CLAMP else dn) + eps)[:, None]
            tl.store(den + row_base + t * H, dn, mask=t < T)
        tl.store(o + offsets, num.to(o.dtype.element_ty), mask=mask)
        if SAVE32:
            tl.store(o32 + offsets, num, mask=mask)
        s2t, z2, s1, z1, s0, z0 = _add_keys(k + qk_base, v + v_base, t, kt, vt, T, s2t, z2, s1, z1, s0, z0, H, D, V,
                                            a0, a1, a2, C, BD, BV, HAS0, HAS1, HAS2, FLAT, LOW, PREC)  # fmt: skip
    if FINAL:
        _store_state(state, row, s2t, z2, s1, z1, s0, z0, BD, BV)


@triton.jit
def fused_chunk_dq_kernel(q, k, v, do, o32, den, dq, state0, seqs, H, D, V, scale, c0, c1, c2, a0, a1, a2, eps,
                          C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BVK: tl.constexpr,
                          HAS0: tl.constexpr, HAS1: tl.constexpr, HAS2: tl.constexpr, INIT: tl.constexpr,
                          NORMALIZE: tl.constexpr, CLAMP: tl.constexpr, FLAT: tl.constexpr, LOW: tl.constexpr,
                          PREC: tl.constexpr, STAGES: tl.constexpr):  # fmt: skip
    """dq for one (sequence, head), forward in time: the chunk's own score gradients plus what the state before
    the chunk (rebuilt as in the forward) gives; the state's symmetry makes d(q^T S2 q)/dq = 2 S2 q."""
    start, T, n, h = _program(seqs, H)
    qk_base, v_base, row_base = _bases(start, h, H, D, V)
    row = _state_row(n, h, H, BD, BV)
    s2t, z2, s1, z1, s0, z0 = _start_state(state0, row, INIT, BD, BV)
    cd, cv = tl.arange(0, BD), tl.arange(0, BV)
    for c in tl.range(0, tl.cdiv(T, C), num_stages=STAGES):
        t = c * C + tl.arange(0, C)
        qt = load_tile(q + qk_base, t, cd, T, H * D, D)
        kt = load_tile(k + qk_base, t, cd, T, H * D, D)
        vt = load_tile(v + v_base, t, cv, T, H * V, V)
        dot = load_tile(do + v_base, t, cv, T, H * V, V)
        r, dd = _row_terms(o32, den, t, T, dot, v_base, row_base, H, V, eps, BV, NORMALIZE, CLAMP)
        _, dp, da = _score_grads(q, k, v, do, t, qt, kt, r, dd, qk_base, v_base, T, H, D, V, scale, c0, c1, c2, BVK,
                                 HAS0, HAS1, PREC)  # fmt: skip
        dqt = tl.dot((da * dp).to(kt.dtype), kt, input_precision=PREC)
        qf, e = qt.to(tl.float32), dd * r
        if HAS2:  # 2 a2 (Q (x) G) S2^T with G = do r, and the normaliser's 2 a2 e Z2 q
            qg = _outer(qt, dot, (2.0 * a2) * r, q + qk_base, do + v_base, t, T, H * D, H * V, D, V, C, BD, BV, FLAT)
            dqt = tl.dot(qg, s2t, dqt, input_precision=PREC)
            dqt += ((2.0 * a2) * e)[:, None] * tl.dot(qf, z2, input_precision=PREC)
        if HAS1:
            dqt += a1 * (_contract_values(dot.to(tl.float32) * r[:, None], s1, BV, PREC) + e[:, None] * z1[None, :])
        tl.store(dq + qk_base + t[:, None] * (H * D) + cd[None, :], dqt.to(dq.dtype.element_ty),
                 mask=(t[:, None] < T) & (cd[None, :] < D))  # fmt: skip
        s2t, z2, s1, z1, s0, z0 = _add_keys(k + qk_base, v + v_base, t, kt, vt, T, s2t, z2, s1, z1, s0, z0, H, D, V,
                                            a0, a1, a2, C, BD, BV, HAS0, HAS1, HAS2, FLAT, LOW, PREC)  # fmt: skip


@triton.jit
def fused_chunk_dkdv_kernel(q, k, v, do, o32, den, dk, dv, dstate, dstate0, seqs, H, D, V, scale, c0, c1, c2, a0, a1,
                            a2, eps, C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BVK: tl.constexpr,
                            HAS0: tl.constexpr, HAS1: tl.constexpr, HAS2: tl.constexpr, DFINAL: tl.constexpr,
                            DINIT: tl.constexpr, NORMALIZE: tl.constexpr, CLAMP: tl.constexpr, FLAT: tl.constexpr,
                            LOW: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr):  # fmt: skip
    """dk, dv for one (sequence, head), backward in time. dS (the gradient of the state after the chunk: later
    chunks' queries, and the final state's gradient from dstate with DFINAL, symmetric) reaches the chunk's keys
    and values; then the chunk's queries join dS. DINIT: the initial state's gradient, dS at the end, into
    dstate0."""
    start, T, n, h = _program(seqs, H)
    qk_base, v_base, row_base = _bases(start, h, H, D, V)
    row = _state_row(n, h, H, BD, BV)
    ds2t, dz2, ds1, dz1, ds0, dz0 = _start_state(dstate, row, DFINAL, BD, BV)
    cd, cv = tl.arange(0, BD), tl.arange(0, BV)
    chunks = tl.cdiv(T, C)
    for i in tl.range(0, chunks, num_stages=STAGES):
        t = (chunks - 1 - i) * C + tl.arange(0, C)
        qt = load_tile(q + qk_base, t, cd, T, H * D, D)
        kt = load_tile(k + qk_base, t, cd, T, H * D, D)
        vt = load_tile(v + v_base, t, cv, T, H * V, V)
        dot = load_tile(do + v_base, t, cv, T, H * V, V)
        r, dd = _row_terms(o32, den, t, T, dot, v_base, row_base, H, V, eps, BV, NORMALIZE, CLAMP)
        p, dp, da = _score_grads(q, k, v, do, t, qt, kt, r, dd, qk_base, v_base, T, H, D, V, scale, c0, c1, c2, BVK,
                                 HAS0, HAS1, PREC)  # fmt: skip
        dvt = _dot_values(tl.trans((p * r[:, None]).to(dot.dtype)), dot, BV, PREC)
        dkt = tl.dot(tl.trans((da * dp).to(qt.dtype)), qt, input_precision=PREC)
        kf, vf = kt.to(tl.float32), vt.to(tl.float32)
        if HAS2:  # a2 sum_j k_j (k dS2)[(j, v)] to dv; 2 a2 (K (x) V) dS2^T + 2 a2 dZ2 k to dk
            u = _state_dot(kt, tl.trans(ds2t), tl.zeros([C, BD * BV], tl.float32), kt, LOW, PREC)
            dvt += a2 * _weighted_sum_over_j(u, kt, k + qk_base, t, T, H * D, D, C, BD, BV, FLAT, PREC)
            kv = _outer(kt, vt, tl.full([C], 2.0 * a2, tl.float32), k + qk_base, v + v_base, t, T, H * D, H * V, D, V,
                        C, BD, BV, FLAT)  # fmt: skip
            dkt = tl.dot(kv, ds2t, dkt, input_precision=PREC)
            dkt += (2.0 * a2) * tl.dot(kf, dz2, input_precision=PREC)
        if HAS1:
            dvt += a1 * _dot_values(kf, ds1, BV, PREC)
            dkt += a1 * (_contract_values(vf, ds1, BV, PREC) + dz1[None, :])
        if HAS0:
            dvt += a0 * ds0[None, :]
        rows = t[:, None] < T
        tl.store(dk + qk_base + t[:, None] * (H * D) + cd[None, :], dkt.to(dk.dtype.element_ty),
                 mask=rows & (cd[None, :] < D))  # fmt: skip
        tl.store(dv + v_base + t[:, None] * (H * V) + cv[None, :], dvt.to(dv.dtype.element_ty),
                 mask=rows & (cv[None, :] < V))  # fmt: skip
        qf, e = qt.to(tl.float32), dd * r
        if HAS2:  # a2 Q^T (Q (x) G) and a2 Q^T (e Q) join dS
            qg = _outer_t(qt, dot, a2 * r, q + qk_base, do + v_base, t, T, H * D, H * V, D, V, C, BD, BV, FLAT)
            ds2t = _state_dot(qg, qt, ds2t, qt, LOW, PREC)
            dz2 += a2 * tl.dot(tl.trans(qf), qf * e[:, None], input_precision=PREC)
        if HAS1:
            ds1 += a1 * _dot_values(tl.trans(qf), dot.to(tl.float32) * r[:, None], BV, PREC)
            dz1 += a1 * tl.sum(qf * e[:, None], 0)
        if HAS0:
            ds0 += a0 * tl.sum(dot.to(tl.float32) * r[:, None], 0)
            dz0 += a0 * tl.sum(e, 0)
    if DINIT:
        _store_state(dstate0, row, ds2t, dz2, ds1, dz1, ds0, dz0, BD, BV)


# ---- host side -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FusedLaunch:
    """One kernel's launch: chunk length, warps, software-pipeline stages of its chunk loop, whether the [C, BF]
    tiles (K (x) V, Q (x) G, the sum over j) come from 3D tiles reshaped (the default) or from gathers and 0/1 dots
    with every tile 2D (flat; Triton 3.6 mis-compiled some of chunk_states' 3D tiles), and whether the state's
    dots take 16-bit operands (low; 16-bit inputs only: faster, the state rounds to the inputs' precision), and
    a cap on registers a thread (max_registers: more warps resident on an SM, the rest spilled; None: the
    compiler's choice, which at these shapes is about all 255 and 8 one-warp programs an SM)."""

    chunk: int = 32
    warps: int = 2
    stages: int = 1
    flat: bool = False
    low: bool = False
    max_registers: int | None = None

    def options(self, dtype: torch.dtype) -> dict:
        """The kernel's launch options for inputs of dtype."""
        cap = {} if self.max_registers is None else {"maxnreg": self.max_registers}
        return dict(C=self.chunk, FLAT=self.flat, LOW=self.low and dtype != torch.float32, STAGES=self.stages,
                    num_warps=self.warps, **cap)  # fmt: skip


# Per kernel on the GPU, for value dims up to 8 (BV 1-8: the MQAR models' 5, the ablation's 1-4), 9-16 (BV 16:
# the d_model 128 models' 10) and wider (BV 32-64). Where a sweep has timed them: the fastest of the launches that
# fused_chunk_gpu.py sweeps on an H200 at B 512, L 2048, each within its error budget against float64. Up to 8 (v 5,
# benchmarks/results/h200_mqar/fused_chunk_v5_f49fce1.md): one warp on chunks of 16 throughout; the forward and dq
# capped at 168 registers a thread, so 12 warps fit an SM where the compiler's ~240 allowed 8: 1.61 and 2.22 ms
# against 1.98 and 2.71 uncapped, the spills cheaper than the latency the extra warps hide. dk/dv, the largest
# state, gains nothing from the cap (3.16 against 3.13) and loses at 128.
GPU_LAUNCHES = {
    "fwd": FusedLaunch(chunk=16, warps=1, stages=1, low=True, max_registers=168),
    "dq": FusedLaunch(chunk=16, warps=1, stages=1, low=True, max_registers=168),
    "dkdv": FusedLaunch(chunk=16, warps=1, stages=1, low=True),
}
# Polynomials with a constant or linear term (Based's Taylor map) carry more state a program (its first- and
# zeroth-order parts beside the square's) and spill about twice ReBased's under the cap on sm_90a. At v 5
# (fused_chunk_v5_based_811f055.md) the cap still pays for the forward (1.94 against 2.12 ms uncapped) and dk/dv
# (5.48 against 5.64), not for dq (4.60 against 4.13).
GPU_LAUNCHES_LOW_TERMS = {
    "fwd": FusedLaunch(chunk=16, warps=1, stages=1, low=True, max_registers=168),
    "dq": FusedLaunch(chunk=16, warps=1, stages=1, low=True),
    "dkdv": FusedLaunch(chunk=16, warps=1, stages=1, low=True, max_registers=168),
}
# BV 16, pure squares: one warp on chunks of 16 with 16-bit state dots, as below BV 16. At v 10 (ReBased,
# fused_chunk_v10_811f055.md) 2.91 + 5.77 + 6.45 = 15.1 ms against 18.5 for two warps on chunks of 32, although
# compiled for sm_90a it spills more (456, 168 and 696 B of stack a thread against 88, 0 and 520).
GPU_LAUNCHES_WIDE = dict.fromkeys(("fwd", "dq", "dkdv"), FusedLaunch(chunk=16, warps=1, stages=1, low=True))
# BV 16 with low-order terms (Based at d_model 128): one warp on chunks of 16 as for ReBased, dq with fp32 state
# dots. At v 10 (fused_chunk_v10_based_726ab68.md) 3.79 + 8.14 + 7.99 = 19.9 ms against 23.6 for two warps on
# chunks of 32; dq's two dot precisions are 2% apart (8.14 against 8.29), within the sweep's noise.
GPU_LAUNCHES_WIDE_LOW_TERMS = {
    "fwd": FusedLaunch(chunk=16, warps=1, stages=1, low=True),
    "dq": FusedLaunch(chunk=16, warps=1, stages=1, low=False),
    "dkdv": FusedLaunch(chunk=16, warps=1, stages=1, low=True),
}
# BV 32-64 (outside what `mode="auto"` sends here: chunk_dispatch.py): two warps on chunks of 32. One warp would
# keep a [256, 32] state a program and spill 2-4 KB a thread on sm_90a; untimed.
GPU_LAUNCHES_WIDER = dict.fromkeys(("fwd", "dq", "dkdv"), FusedLaunch(chunk=32, warps=2))
# Under the interpreter: chunks of 16, so tiny test shapes cross several chunks.
INTERPRETER_LAUNCHES = dict.fromkeys(("fwd", "dq", "dkdv"), FusedLaunch(chunk=16))
# The narrowest padded value dim. 1: value dims pad only to their power of two; the -bv8 variant of
# benchmarks/mqar_cost_gpu.py sets 8 to time what the narrower state saves.
MIN_BV = 1
FUSED_FP32_DOTS = "ieee"  # fp32 inputs: the accurate path (as the chunk kernels' CHUNK_FP32_DOTS)


GPU_LAUNCH_TABLES = {"GPU_LAUNCHES": GPU_LAUNCHES, "GPU_LAUNCHES_LOW_TERMS": GPU_LAUNCHES_LOW_TERMS,
                     "GPU_LAUNCHES_WIDE": GPU_LAUNCHES_WIDE, "GPU_LAUNCHES_WIDE_LOW_TERMS": GPU_LAUNCHES_WIDE_LOW_TERMS,
                     "GPU_LAUNCHES_WIDER": GPU_LAUNCHES_WIDER}  # fmt: skip


def gpu_launch_table(value_dim: int, poly: PolynomialArgs) -> str:
    """The name of the GPU table that launches this value dim and polynomial (GPU_LAUNCH_TABLES): by the padded
    width and, up to 16, by whether the polynomial has low-order terms. The launch sweep prints its choice under
    it."""
    bv = Dims.of(1, value_dim).bv
    if bv > 16:
        return "GPU_LAUNCHES_WIDER"
    low_terms = "_LOW_TERMS" if poly.c0 > 0 or poly.c1 > 0 else ""
    return ("GPU_LAUNCHES_WIDE" if bv == 16 else "GPU_LAUNCHES") + low_terms


def launches(value_dim: int, poly: PolynomialArgs) -> dict[str, FusedLaunch]:
    """Each kernel's launch for this value dim and polynomial: the interpreter's, or its GPU table's."""
    if interpreting():
        return INTERPRETER_LAUNCHES
    return GPU_LAUNCH_TABLES[gpu_launch_table(value_dim, poly)]


@dataclass(frozen=True)
class Dims:
    """One call's padded dims: BD (q/k), BV (values in the state), BVK (values where a dot contracts them)."""

    bd: int
    bv: int

    @classmethod
    def of(cls, head_dim: int, value_dim: int) -> Dims:
        return cls(max(16, triton.next_power_of_2(head_dim)), max(MIN_BV, triton.next_power_of_2(value_dim)))

    @property
    def bvk(self) -> int:
        return max(16, self.bv)

    def state_size(self) -> int:
        """Floats in one (sequence, head)'s packed state: S2, Z2, S1, z1, s0, z0 (_state_offsets)."""
        bd, bv = self.bd, self.bv
        return bd * bd * bv + bd * bd + bd * bv + bd + bv + 1


def _terms(kv: Tensor, ksum: Tensor, d: int, poly: PolynomialArgs) -> dict[str, tuple[Tensor, Tensor]]:
    """LinearAttentionState's feature rows [const | linear d | square d*d] by term: name -> (kv rows, k_sum rows)."""
    terms, row = {}, 0
    if poly.c0 > 0:
        terms["const"], row = (kv[..., :1, :], ksum[..., :1]), 1
    if poly.c1 > 0:
        terms["linear"], row = (kv[..., row : row + d, :], ksum[..., row : row + d]), row + d
    if poly.c2 > 0:
        terms["square"] = (kv[..., row:, :].unflatten(-2, (d, d)), ksum[..., row:].unflatten(-1, (d, d)))
    return terms


def _symmetric_square(kv: Tensor, ksum: Tensor, d: int, poly: PolynomialArgs) -> tuple[Tensor, Tensor]:
    """The state with its square rows (i, j) replaced by their mean with (j, i): what queries see of it."""
    if poly.c2 == 0:
        return kv, ksum
    rows = kv.shape[-2] - d * d
    sq_kv, sq_z = _terms(kv, ksum, d, poly)["square"]
    sq_kv = (sq_kv + sq_kv.transpose(-3, -2)) / 2
    sq_z = (sq_z + sq_z.transpose(-2, -1)) / 2
    kv = torch.cat([kv[..., :rows, :], sq_kv.flatten(-3, -2)], -2)
    return kv, torch.cat([ksum[..., :rows], sq_z.flatten(-2)], -1)


def pack_state(kv: Tensor, ksum: Tensor, d: int, dims: Dims, poly: PolynomialArgs) -> Tensor:
    """[N, H, F, V], [N, H, F] -> the kernels' packed rows [N, H, state_size] (fp32, zero padded); torch ops, so
    autograd carries gradients through it."""
    n, h, _, value_dim = kv.shape
    bd, bv = dims.bd, dims.bv
    pv, pd = bv - value_dim, bd - d
    terms = _terms(kv.float(), ksum.float(), d, poly)
    pad = torch.nn.functional.pad
    parts = [kv.new_zeros(n, h, bd * bd * bv), kv.new_zeros(n, h, bd * bd)]
    if "square" in terms:
        s2, z2 = terms["square"]
        parts = [pad(s2, (0, pv, 0, pd, 0, pd)).flatten(2), pad(z2, (0, pd, 0, pd)).flatten(2)]
    parts += [kv.new_zeros(n, h, bd * bv), kv.new_zeros(n, h, bd)]
    if "linear" in terms:
        s1, z1 = terms["linear"]
        parts[2:] = [pad(s1, (0, pv, 0, pd)).flatten(2), pad(z1, (0, pd))]
    parts += [kv.new_zeros(n, h, bv), kv.new_zeros(n, h, 1)]
    if "const" in terms:
        s0, z0 = terms["const"]
        parts[4:] = [pad(s0[:, :, 0], (0, pv)), z0]
    return torch.cat([x.float() for x in parts], 2).contiguous()


def unpack_state(packed: Tensor, d: int, value_dim: int, dims: Dims, poly: PolynomialArgs) -> tuple[Tensor, Tensor]:
    """The inverse of pack_state: [N, H, state_size] -> kv [N, H, F, V], k_sum [N, H, F]."""
    bd, bv = dims.bd, dims.bv
    sizes = [bd * bd * bv, bd * bd, bd * bv, bd, bv, 1]
    s2, z2, s1, z1, s0, z0 = packed.split(sizes, 2)
    kv, ksum = [], []
    if poly.c0 > 0:
        kv.append(s0[..., None, :value_dim])
        ksum.append(z0)
    if poly.c1 > 0:
        kv.append(s1.unflatten(2, (bd, bv))[..., :d, :value_dim])
        ksum.append(z1[..., :d])
    if poly.c2 > 0:
        kv.append(s2.unflatten(2, (bd, bd, bv))[..., :d, :d, :value_dim].flatten(2, 3))
        ksum.append(z2.unflatten(2, (bd, bd))[..., :d, :d].flatten(2))
    return torch.cat(kv, 2), torch.cat(ksum, 2)


def _symmetrise_packed(packed: Tensor, dims: Dims) -> Tensor:
    """The packed state (or gradient) with S2 and Z2 made symmetric in (i, j)."""
    bd, bv = dims.bd, dims.bv
    s2, z2, rest = packed.split([bd * bd * bv, bd * bd, packed.shape[2] - bd * bd * (bv + 1)], 2)
    s2 = s2.unflatten(2, (bd, bd, bv))
    z2 = z2.unflatten(2, (bd, bd))
    s2 = ((s2 + s2.transpose(2, 3)) / 2).flatten(2)
    z2 = ((z2 + z2.transpose(2, 3)) / 2).flatten(2)
    return torch.cat([s2, z2, rest], 2).contiguous()


@cached_when_dense
def sequence_table(sequences: Sequences, device: torch.device) -> Tensor:
    """int32 [N, 3] rows (start, length, state row), longest sequences first (a long walk started last would
    be the launch's tail)."""
    starts, lengths = sequences.bounds()
    order = torch.argsort(lengths, descending=True, stable=True)
    return torch.stack([starts[order], lengths[order], order], 1).to(device=device, dtype=torch.int32).contiguous()


def _kernel_args(q: Tensor, v: Tensor, table: Tensor, poly: PolynomialArgs, normalize: bool, eps: float) -> dict:
    """What every fused kernel takes besides its tensors and flags: the grid, H, D, V, the polynomial, the
    padded dims and dot precision."""
    dims = Dims.of(q.shape[2], v.shape[2])
    return dict(grid=(len(table) * q.shape[1],), H=q.shape[1], D=q.shape[2], V=v.shape[2], eps=eps,
                **poly.score_args(), **poly.feature_args(), HAS2=poly.c2 > 0, BD=dims.bd, BV=dims.bv,
                PREC=dot_precision(q.dtype, FUSED_FP32_DOTS), NORMALIZE=normalize, CLAMP=poly.clamp)  # fmt: skip


def launch_forward(q, k, v, state0, table, poly: PolynomialArgs, normalize: bool, eps: float, final: bool,
                   save32: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:  # fmt: skip
    """The forward kernel on q, k [tokens, H, D], v [tokens, H, V] (the sequences packed) from the packed
    symmetric state0 [N, H, state_size] (or None): o, its fp32 copy (o itself unless save32), den [tokens, H] and
    the final packed state (if final)."""
    args = _kernel_args(q, v, table, poly, normalize, eps)
    o = torch.empty_like(v)
    o32 = torch.empty(v.shape, dtype=torch.float32, device=v.device) if save32 else o
    den = q.new_empty(q.shape[0], q.shape[1], dtype=torch.float32)
    size = Dims.of(q.shape[2], v.shape[2]).state_size()
    state = q.new_empty(len(table), q.shape[1], size, dtype=torch.float32) if final else None
    grid = args.pop("grid")
    if grid[0]:
        fused_chunk_fwd_kernel[grid](
            q, k, v, o, o32, den, q if state0 is None else state0, o32 if state is None else state, table, **args,
            INIT=state0 is not None, FINAL=final, SAVE32=save32, **launches(v.shape[2], poly)["fwd"].options(q.dtype),
        )  # fmt: skip
    return o, o32, den, state


def launch_dq(q, k, v, do, o32, den, state0, table, poly: PolynomialArgs, normalize: bool, eps: float) -> Tensor:
    """dq (the dq kernel), for the forward's o32 and den."""
    args = _kernel_args(q, v, table, poly, normalize, eps)
    dq = torch.empty_like(q)
    grid = args.pop("grid")
    if grid[0]:
        fused_chunk_dq_kernel[grid](
            q, k, v, do, o32, den, dq, q if state0 is None else state0, table, **args, INIT=state0 is not None,
            BVK=Dims.of(q.shape[2], v.shape[2]).bvk, **launches(v.shape[2], poly)["dq"].options(q.dtype),
        )  # fmt: skip
    return dq


def launch_dkdv(q, k, v, do, o32, den, d_final, want_init: bool, table, poly: PolynomialArgs, normalize: bool,
                eps: float) -> tuple[Tensor, Tensor, Tensor | None]:  # fmt: skip
    """dk, dv and (want_init) the initial packed state's gradient (the dkdv kernel), from the final packed state's
    symmetrised gradient d_final (or None)."""
    args = _kernel_args(q, v, table, poly, normalize, eps)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    size = Dims.of(q.shape[2], v.shape[2]).state_size()
    d_init = q.new_empty(len(table), q.shape[1], size, dtype=torch.float32) if want_init else None
    grid = args.pop("grid")
    if grid[0]:
        fused_chunk_dkdv_kernel[grid](
            q, k, v, do, o32, den, dk, dv, q if d_final is None else d_final, q if d_init is None else d_init, table,
            **args, DFINAL=d_final is not None, DINIT=want_init, BVK=Dims.of(q.shape[2], v.shape[2]).bvk,
            **launches(v.shape[2], poly)["dkdv"].options(q.dtype),
        )  # fmt: skip
    return dk, dv, d_init


class FusedChunkFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, state0, table, poly: PolynomialArgs, output_final_state: bool, normalize: bool,
                eps: float, for_backward: bool):  # fmt: skip
        """q, k [tokens, H, D], v [tokens, H, V] (the sequences packed); state0 [N, H, state_size] symmetric
        (or None). Returns o and the final packed state (or None)."""
        save32 = for_backward and v.dtype != torch.float32
        o, o32, den, state = launch_forward(q, k, v, state0, table, poly, normalize, eps, output_final_state, save32)
        ctx.save_for_backward(q, k, v, o32, den, state0, table)
        ctx.poly, ctx.normalize, ctx.eps = poly, normalize, eps
        return o, state

    @staticmethod
    def backward(ctx, do, d_state):
        q, k, v, o32, den, state0, table = ctx.saved_tensors
        options = dict(table=table, poly=ctx.poly, normalize=ctx.normalize, eps=ctx.eps)
        do = do.to(v.dtype).contiguous()
        dq = launch_dq(q, k, v, do, o32, den, state0, **options)
        dims = Dims.of(q.shape[2], v.shape[2])
        d_final = None if d_state is None else _symmetrise_packed(d_state.float(), dims)
        want_init = state0 is not None and ctx.needs_input_grad[3]
        dk, dv, d_init = launch_dkdv(q, k, v, do, o32, den, d_final, want_init, **options)
        return dq, dk, dv, d_init, None, None, None, None, None, None


# ---- the op --------------------------------------------------------------------------------------------------

MAX_HEAD_DIM = 32  # BD 32: a [32, 32 BV] square state; beyond it the state outgrows the registers
MAX_VALUE_DIM = 64  # BV 64: a [16, 1024] square state, which spills: correct, not fast (chunk_dispatch.py: v <= 16)


def refuse(q: Tensor, k: Tensor, v: Tensor) -> None:
    """NotImplementedError for what the fused chunk kernels do not cover, before any work."""
    what = "fused chunk (backend='triton')"
    check_dtype_and_device(what, q, k, v)
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_VALUE_DIM:
        raise NotImplementedError(
            f"{what} covers q/k dims up to {MAX_HEAD_DIM} and value dims up to {MAX_VALUE_DIM}, got "
            f"{q.shape[-1]}, {v.shape[-1]}"
        )


# Whether a value dim from 9 to 16 that is not a power of two runs as one pass of the kernels per power-of-two piece (10
# as 8 + 2) rather than padded to 16: o = num / den splits by value columns, every piece having the same normaliser.
# Each piece repeats the q/k side (scores, normaliser) and autograd adds the pieces' dq and dk. At MQAR's shapes on an
# H200 (B 512, L 2048; benchmarks/results/h200_mqar/fused_chunk_split_f49fce1.md) the op took 15.6 ms in pieces against
# 18.5 padded at v 10 (BV 16 then ran two warps on chunks of 32; one warp takes 15.1), but 11.3 against 7.8 at v 5,
# where the q/k side is most of the cost: so value dims up to 8 never split. The d_model 128 step read 49.3 against 49.2
# ms in a timing whose repeats disagreed by more than that (mqar_step_split_f49fce1.log), so it is off until a steadier
# one.
SPLIT_VALUES = False
SPLIT_VALUE_DIMS = range(9, 17)  # narrower ones lose (above); wider ones leave the fused kernels (chunk_dispatch.py)


def value_pieces(value_dim: int) -> list[int]:
    """The widths value_dim runs as, largest first: its powers of two when SPLIT_VALUES and it is in
    SPLIT_VALUE_DIMS, else [value_dim]."""
    if not SPLIT_VALUES or value_dim not in SPLIT_VALUE_DIMS:
        return [value_dim]
    return [1 << bit for bit in reversed(range(value_dim.bit_length())) if value_dim >> bit & 1]


def _run_pieces(q, k, v, pieces, sequences, kernel, initial_state, output_final_state, normalize, eps):
    """_run over v's value columns in pieces: the outputs and final states' kv side by side, k_sum (the same for
    every piece) from the first; an initial state's kv split the same way, its k_sum given to every piece."""
    states = [None] * len(pieces)
    if initial_state is not None:
        states = [LinearAttentionState(kv, initial_state.k_sum) for kv in initial_state.kv.split(pieces, -1)]
    runs = [_run(q, k, part, sequences, kernel, state, output_final_state, normalize, eps)
            for part, state in zip(v.split(pieces, -1), states)]  # fmt: skip
    o = torch.cat([o for o, _ in runs], -1)
    if not output_final_state:
        return o, None
    return o, LinearAttentionState(torch.cat([final.kv for _, final in runs], -1), runs[0][1].k_sum)


def _run(q, k, v, sequences: Sequences, kernel, initial_state, output_final_state, normalize, eps):
    """q, k, v [tokens, H, *] packed -> (o [tokens, H, V], final state or None)."""
    pieces = value_pieces(v.shape[-1])
    if len(pieces) > 1:
        return _run_pieces(q, k, v, pieces, sequences, kernel, initial_state, output_final_state, normalize, eps)
    poly = PolynomialArgs.of(kernel)
    head_dim, value_dim = q.shape[-1], v.shape[-1]
    dims = Dims.of(head_dim, value_dim)
    state0 = residual = None
    if initial_state is not None:
        kv0, ksum0 = (x.float() for x in initial_state)
        seen = _symmetric_square(kv0, ksum0, head_dim, poly)  # what queries read; the rest passes to the end
        state0 = pack_state(*seen, head_dim, dims, poly)
        residual = (kv0 - seen[0], ksum0 - seen[1])
    table = sequence_table(sequences, q.device)
    for_backward = wants_gradients(q, k, v, *(() if state0 is None else (state0,)))
    o, packed = FusedChunkFunction.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), state0, table, poly, output_final_state, normalize, eps,
        for_backward,
    )  # fmt: skip
    if not output_final_state:
        return o, None
    kv, ksum = unpack_state(packed, head_dim, value_dim, dims, poly)
    if residual is not None:
        kv, ksum = kv + residual[0], ksum + residual[1]
    return o, LinearAttentionState(kv, ksum)


def fused_chunk_linear_attention(
    q: Tensor,  # [B, T, H, D]
    k: Tensor,  # [B, T, H, D]
    v: Tensor,  # [B, T, H, V]
    *,
    kernel: Polynomial | None,
    initial_state: LinearAttentionState | None,
    output_final_state: bool,
    normalize: bool,
    eps: float,
    chunk_size: int,
) -> tuple[Tensor, LinearAttentionState | None]:
    """The op contract's chunk mode through the fused kernels: q/k dims up to 32, value dims up to 64, any
    polynomial, initial and final state. chunk_size is the torch mode's knob (the kernels' is FusedLaunch.chunk)."""
    del chunk_size
    refuse(q, k, v)
    batch, length = q.shape[:2]
    o, final = _run(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), Sequences(batch=batch, length=length), kernel,
                    initial_state, output_final_state, normalize, eps)  # fmt: skip
    return o.unflatten(0, (batch, length)), final


def packed_fused_chunk_linear_attention(
    q: Tensor,  # [1, T_total, H, D]
    k: Tensor,
    v: Tensor,  # [1, T_total, H, V]
    cu_seqlens: Tensor,  # [N + 1]
    *,
    kernel: Polynomial | None,
    initial_state: LinearAttentionState | None,
    output_final_state: bool,
    normalize: bool,
    eps: float,
    chunk_size: int,
) -> tuple[Tensor, LinearAttentionState | None]:
    """cu_seqlens: one program per (sequence, head) walks its own offsets; states have N rows."""
    del chunk_size
    refuse(q, k, v)
    o, final = _run(q[0], k[0], v[0], Sequences(cu_seqlens=cu_seqlens), kernel, initial_state, output_final_state,
                    normalize, eps)  # fmt: skip
    return o.unsqueeze(0), final


__all__ = [
    "GPU_LAUNCHES",
    "GPU_LAUNCHES_LOW_TERMS",
    "FusedLaunch",
    "fused_chunk_linear_attention",
    "packed_fused_chunk_linear_attention",
    "refuse",
]
