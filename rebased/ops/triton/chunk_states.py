"""Chunked linear attention with the chunk states in memory: the ("chunk", "triton") pair's Triton kernels.

    phi(x) = [a0, a1 x, a2 vec(x (x) x)]  (a_i^2 = c_i scale^i)
    S_c = S_0 + sum_{t < c C} phi(k_t) v_t^T       (the state chunk c's queries read)

A kernel that walks a sequence's chunks in one program must hold the whole state [F, BV] and a chunk's
features [C, F] in registers; with F = 256 that spills. Here the states live in memory and phi splits into NB
blocks of BD rows, each a scalar times a D-vector:

    block j < NQ (= BD with a square term):  a2 x_j x      block NQ (with a linear term):  a1 x
    the last block (with a constant term):    a0 e_0       (NB = NQ + [c1 > 0] + [c0 > 0])

Square blocks past D hold zeros, so the square part is NQ BD = BD^2 contiguous feature rows, and a kernel
takes G of its blocks in one [rows, G BD] x [G BD, BV] dot (TILE_CONFIGS; the linear and constant blocks
one at a time). Five kernels, O(T) work; all but the scan over chunk slots are independent programs:

    chunk_sums  program (chunk c, head): chunk c's own phi(K_c)^T V_c (forward) or phi(Q_c)^T g_c
                (backward, g = do r, r = 1 / (den + eps))
    scan        program (block j x value slice, sequence, head): in place, prefix sums over the slots make
                S_c, suffix sums the gradients dS_c = dS_final + sum_{c' > c} phi(Q_c')^T g_c' and the
                initial state's
    output      program (query block, head): intra-chunk quadratic part (the parallel kernel's tiles) plus
                phi(q) S_c, then o = num / (den + eps)
    dq / dkdv   programs (row block, head): the parallel kernel's intra-chunk tiles plus the state terms
                dq += d phi(q)^T (S_c g + z_c dd r),  dv += phi(k) dS_c,  dk += d phi(k)^T (dS_c v + dz_c)

The chunk states cost memory and bandwidth: NB x BD x BV fp32 per chunk and head, at C = 256 (ReBased, D 16,
V 64) 256 bytes a token and head; a longer chunk halves that and doubles the intra-chunk tiles, and C = 256
is where that trade was fastest on the H200 (CHUNK). States are laid out [slots, H, NB, BD, BV] (padded, so
no masks): sequence n owns count_n + 1 slots (its initial state, then the state after each chunk). Programs
find their chunk or row block, and their sequence's slots, in a Plan's tables (sequences.py), so a dense
batch (B sequences of T) and a packed cu_seqlens one run the same kernels, one launch each. The caller
converts initial and final states from and to LinearAttentionState's feature rows.

Shape letters: C chunk, BM, BN row blocks (C a multiple of both), BD, BV the padded q/k and value dims, NB
feature blocks, G square blocks per dot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from rebased.ops.common import LinearAttentionState, feature_dim
from rebased.ops.kernels import Polynomial
from rebased.ops.triton.inputs import PolynomialArgs, check_dtype_and_device, check_head_dims, wants_gradients
from rebased.ops.triton.launch import dot_precision, interpreting, launch_fitting
from rebased.ops.triton.parallel import backward_row_terms
from rebased.ops.triton.sequences import Sequences, cached_when_dense, program_table
from rebased.ops.triton.tiles import load_tile, masked_scores, query_terms, score_grads


@triton.jit
def _is_linear(j, NQ: tl.constexpr, HAS1: tl.constexpr):
    """Whether feature block j (>= NQ) is the linear one (it follows the square blocks, when there is one)."""
    return j == NQ if HAS1 else j < 0


@triton.jit
def _block_features(x, j, NQ: tl.constexpr, a0, a1, valid, cd, HAS1: tl.constexpr):
    """phi's block j >= NQ of each row of x [R, BD] (fp32): a1 x (linear) or a0 e_0 (constant); rows that are
    not valid give 0."""
    linear = _is_linear(j, NQ, HAS1)
    base = tl.where(linear, x, (cd == 0).to(tl.float32)[None, :])
    return (tl.where(linear, a1, a0) * valid)[:, None] * base


@triton.jit
def _block_feature_grad(g, j, NQ: tl.constexpr, a1, HAS1: tl.constexpr):
    """d(g . phi_j(x)) / dx per row for a block j >= NQ, g [R, BD] the gradient of the block: a1 g or 0."""
    return tl.where(_is_linear(j, NQ, HAS1), a1 * g, 0.0)


@triton.jit
def _selectors(first, G: tl.constexpr, BD: tl.constexpr):
    """0/1 [BD, G BD] matrices: x @ pick repeats x_{first + f // BD} along column f, x @ tile is x_{f % BD}."""
    m = tl.arange(0, BD)[:, None]
    f = tl.arange(0, G * BD)[None, :]
    return (m == first + f // BD).to(tl.float32), (m == f % BD).to(tl.float32)


@triton.jit
def _group_features(xg, x, first, a2, R: tl.constexpr, G: tl.constexpr, BD: tl.constexpr, SEL: tl.constexpr,
                    PREC: tl.constexpr):  # fmt: skip
    """Square blocks first .. first + G - 1 of phi for each row, as one [R, G BD] tile: block i is
    a2 x_{first + i} x (xg [R, G]: those columns of x [R, BD]; fp32; rows read as 0 give 0). SEL builds it
    from two selector dots (2D only; exact while x is exact in PREC, as 16-bit inputs are in tf32) instead
    of a [R, G, BD] product."""
    if G == 1:  # 2D only: the form measured exact on the H200 (3D tiles are not, see TILE_CONFIGS)
        return a2 * xg * x
    if SEL:
        pick, tile = _selectors(first, G, BD)
        return a2 * tl.dot(x, pick, input_precision=PREC) * tl.dot(x, tile, input_precision=PREC)
    return tl.reshape(a2 * xg[:, :, None] * x[:, None, :], (R, G * BD))


@triton.jit
def _group_feature_grad(g, xg, x, first, a2, R: tl.constexpr, G: tl.constexpr, BD: tl.constexpr,
                        SEL: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """d(g . _group_features(xg, x)) / dx per row, g [R, G BD]. With g3 = g as [R, G, BD]: block i's scalar
    x_{first + i} gets a2 g3[:, i, :] . x, and every x_l gets a2 sum_i g3[:, i, l] x_{first + i}. SEL: the
    same two sums as dots against the transposed selectors (g x rounds to PREC there)."""
    if G == 1:  # a2 (x_first g + (g . x) e_first), in 2D
        return a2 * (xg * g + tl.where(tl.arange(0, BD)[None, :] == first, tl.sum(g * x, 1)[:, None], 0.0))
    if SEL:
        pick, tile = _selectors(first, G, BD)
        x_pick, x_tile = tl.dot(x, pick, input_precision=PREC), tl.dot(x, tile, input_precision=PREC)
        scalars = tl.dot(g * x_tile, tl.trans(pick), input_precision=PREC)
        return a2 * (scalars + tl.dot(g * x_pick, tl.trans(tile), input_precision=PREC))
    g3 = tl.reshape(g, (R, G, BD))
    scalars = tl.sum(g3 * x[:, None, :], 2)  # [R, G]
    place = (tl.arange(0, BD)[None, :] == first + tl.arange(0, G)[:, None]).to(tl.float32)  # [G, BD] one-hot
    return a2 * (tl.sum(scalars[:, :, None] * place[None, :, :], 1) + tl.sum(g3 * xg[:, :, None], 1))


@triton.jit
def _group_columns(x, base, t, first, T, stride, D, G: tl.constexpr):
    """x[t, first .. first + G - 1] as fp32 [len(t), G] (columns past D read 0)."""
    return load_tile(x + base, t, first + tl.arange(0, G), T, stride, D).to(tl.float32)


@triton.jit
def _block_index(slot, h, j, H, NB):
    """Which [BD, BV] block of the [slots, H, NB, BD, BV] states holds feature block j of head h in `slot`."""
    return (slot * H + h) * NB + j


@triton.jit
def _state_offsets(slot, h, j, H, NB, cd, cv, BD: tl.constexpr, BV: tl.constexpr):
    """Offsets of feature block j of head h in state slot `slot`: [BD, BV] in s, [BD] in z."""
    base = _block_index(slot, h, j, H, NB)
    return base * BD * BV + cd[:, None] * BV + cv[None, :], base * BD + cd


@triton.jit
def _group_offsets(slot, h, first, H, NB, cv, G: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr):
    """Offsets of the G consecutive feature blocks from `first` of head h in `slot`: [G BD, BV] in s, [G BD]
    in z (blocks are contiguous, so a group is one tile)."""
    base = _block_index(slot, h, first, H, NB)
    f = tl.arange(0, G * BD)
    return base * BD * BV + f[:, None] * BV + cv[None, :], base * BD + f


@triton.jit
def _entry(table):
    """This program's table row: (sequence start, sequence length, chunk or row-block index, the sequence's
    first state slot), and its head (program axis 1)."""
    row = table + tl.program_id(0) * 4
    start, length, index = tl.load(row).to(tl.int64), tl.load(row + 1), tl.load(row + 2)
    return start, length, index, tl.load(row + 3).to(tl.int64), tl.program_id(1)


@triton.jit
def _sum_terms(x, y, r, dd, x_base, y_base, row_base, t, cd, cv, T, H, D, V, GRAD: tl.constexpr):
    """Rows t of a chunk for chunk_sums, fp32: x [R, BD]; y [R, BV] (v, or do r); w [R] (1, or dd r; 0 past
    T), what phi(x) is summed against."""
    xt = load_tile(x + x_base, t, cd, T, H * D, D).to(tl.float32)
    yt = load_tile(y + y_base, t, cv, T, H * V, V).to(tl.float32)
    w = (t < T).to(tl.float32)
    if GRAD:
        rt = tl.load(r + row_base + t * H, mask=t < T, other=0.0)
        yt = yt * rt[:, None]
        w = tl.load(dd + row_base + t * H, mask=t < T, other=0.0) * rt
    return xt, yt, w


@triton.jit
def chunk_sums_kernel(x, y, r, dd, s, z, table, H, D, V, a0, a1, a2, SHIFT,
                      C: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, NQ: tl.constexpr,
                      G: tl.constexpr, SEL: tl.constexpr, NB: tl.constexpr, HAS1: tl.constexpr,
                      GRAD: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Chunk c's own sums, every feature block, into the sequence's slot c + SHIFT:
    forward  (GRAD=False): phi(K_c)^T V_c and phi(K_c)^T 1                       (x = k, y = v)
    backward (GRAD=True):  phi(Q_c)^T (do r)_c and phi(Q_c)^T (dd r)_c           (x = q, y = do)
    One program per (chunk table row, head). The square blocks go G at a time, one [G BD, BV] dot per BC
    rows; the linear and constant blocks take the whole chunk at once. scan_kernel then turns the slots into
    states."""
    start, T, c, first, h = _entry(table)
    x_base, y_base, row_base = (start * H + h) * D, (start * H + h) * V, start * H + h
    cd, cv = tl.arange(0, BD), tl.arange(0, BV)
    slot = first + c + SHIFT
    for group in range(NQ // G):
        acc = tl.zeros([G * BD, BV], tl.float32)
        acc_z = tl.zeros([G * BD], tl.float32)
        for sub in range(0, C, BC):
            t = c * C + sub + tl.arange(0, BC)
            xt, yt, w = _sum_terms(x, y, r, dd, x_base, y_base, row_base, t, cd, cv, T, H, D, V, GRAD)
            xg = _group_columns(x, x_base, t, group * G, T, H * D, D, G)
            phi = _group_features(xg, xt, group * G, a2, BC, G, BD, SEL, PREC)
            acc += tl.dot(tl.trans(phi), yt, input_precision=PREC)
            acc_z += tl.sum(phi * w[:, None], 0)
        s_off, z_off = _group_offsets(slot, h, group * G, H, NB, cv, G, BD, BV)
        tl.store(s + s_off, acc.to(s.dtype.element_ty))
        tl.store(z + z_off, acc_z)
    if NB > NQ:
        t = c * C + tl.arange(0, C)
        xt, yt, w = _sum_terms(x, y, r, dd, x_base, y_base, row_base, t, cd, cv, T, H, D, V, GRAD)
        valid = (t < T).to(tl.float32)
        for j in range(NQ, NB):
            phi = _block_features(xt, j, NQ, a0, a1, valid, cd, HAS1)
            s_off, z_off = _state_offsets(slot, h, j, H, NB, cd, cv, BD, BV)
            tl.store(s + s_off, tl.dot(tl.trans(phi), yt, input_precision=PREC).to(s.dtype.element_ty))
            tl.store(z + z_off, tl.sum(phi * w[:, None], 0))


@triton.jit
def scan_kernel(s, z, seqs, H, BD: tl.constexpr, BV: tl.constexpr, SV: tl.constexpr, U: tl.constexpr,
                REVERSE: tl.constexpr):  # fmt: skip
    """In place along one sequence's slots (seqs row program_id 1: first slot, chunk count), for head
    program_id 2 and, on axis 0, feature block j times a column slice of SV values: prefix sums, or suffix sums
    with REVERSE, in fp32 whatever the slots hold. One read and one write of the states. The walk is
    sequential, so it takes U slots at a time (a cumulative sum across them, plus the carry: U times fewer
    dependent steps), and the value slices give long single sequences more programs; slice 0 also scans z."""
    NVS: tl.constexpr = BV // SV
    j, part, n, h = tl.program_id(0) // NVS, tl.program_id(0) % NVS, tl.program_id(1), tl.program_id(2)
    NB = tl.num_programs(0) // NVS
    first, count = tl.load(seqs + n * 2).to(tl.int64), tl.load(seqs + n * 2 + 1)
    cd, cv, u = tl.arange(0, BD), part * SV + tl.arange(0, SV), tl.arange(0, U)
    carry = tl.zeros([BD, SV], tl.float32)
    carry_z = tl.zeros([BD], tl.float32)
    for walked in range(0, count + 1, U):
        step = walked + u  # position along the walk; the slot is first + step, or first + count - step
        valid = step <= count
        block = _block_index(first + (count - step if REVERSE else step), h, j, H, NB)  # [U]
        s_off = block[:, None, None] * (BD * BV) + cd[None, :, None] * BV + cv[None, None, :]
        tile = tl.load(s + s_off, mask=valid[:, None, None], other=0.0).to(tl.float32)  # [U, BD, SV]
        tl.store(s + s_off, (tl.cumsum(tile, 0) + carry[None]).to(s.dtype.element_ty), mask=valid[:, None, None])
        carry += tl.sum(tile, 0)
        if part == 0:
            z_off = block[:, None] * BD + cd[None, :]
            tile_z = tl.load(z + z_off, mask=valid[:, None], other=0.0)  # [U, BD]
            tl.store(z + z_off, tl.cumsum(tile_z, 0) + carry_z[None], mask=valid[:, None])
            carry_z += tl.sum(tile_z, 0)


@triton.jit
def output_kernel(q, k, v, s, z, o, o32, den, table, H, D, V, scale, c0, c1, c2, a0, a1, a2, eps,
                  C: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
                  NQ: tl.constexpr, G: tl.constexpr, SEL: tl.constexpr, NB: tl.constexpr, HAS0: tl.constexpr,
                  HAS1: tl.constexpr, NORMALIZE: tl.constexpr, CLAMP: tl.constexpr, SAVE32: tl.constexpr,
                  PREC: tl.constexpr):  # fmt: skip
    start, T, m, first, h = _entry(table)
    qk_base, v_base, row_base = (start * H + h) * D, (start * H + h) * V, start * H + h
    rows = m * BM + tl.arange(0, BM)
    c = (m * BM) // C
    cd, cv = tl.arange(0, BD), tl.arange(0, BV)
    qt = load_tile(q + qk_base, rows, cd, T, H * D, D)
    acc = tl.zeros([BM, BV], tl.float32)
    dn = tl.zeros([BM], tl.float32)
    for start in range(c * C, tl.minimum((m + 1) * BM, T), BN):  # this chunk's keys up to the diagonal
        cols = start + tl.arange(0, BN)
        kt = load_tile(k + qk_base, cols, cd, T, H * D, D)
        vt = load_tile(v + v_base, cols, cv, T, H * V, V)
        p, _ = masked_scores(qt, kt, rows, cols, T, scale, c0, c1, c2, PREC, HAS0, HAS1)
        p = p.to(vt.dtype)  # the normaliser sums the same rounded scores (parallel.py says why)
        dn += tl.sum(p.to(tl.float32), 1)
        acc += tl.dot(p, vt, input_precision=PREC)
    qf = qt.to(tl.float32)
    for group in range(NQ // G):  # the state before this chunk: the square blocks, G at a time
        qg = _group_columns(q, qk_base, rows, group * G, T, H * D, D, G)
        phi = _group_features(qg, qf, group * G, a2, BM, G, BD, SEL, PREC)
        s_off, z_off = _group_offsets(first + c, h, group * G, H, NB, cv, G, BD, BV)
        acc += tl.dot(phi, tl.load(s + s_off).to(tl.float32), input_precision=PREC)
        dn += tl.sum(phi * tl.load(z + z_off)[None, :], 1)
    valid = (rows < T).to(tl.float32)
    for j in range(NQ, NB):  # then the linear and constant blocks
        s_off, z_off = _state_offsets(first + c, h, j, H, NB, cd, cv, BD, BV)
        phi = _block_features(qf, j, NQ, a0, a1, valid, cd, HAS1)
        acc += tl.dot(phi, tl.load(s + s_off).to(tl.float32), input_precision=PREC)
        dn += tl.sum(phi * tl.load(z + z_off)[None, :], 1)
    offsets = v_base + rows[:, None] * (H * V) + cv[None, :]
    mask = (rows[:, None] < T) & (cv[None, :] < V)
    if NORMALIZE:
        acc = acc / ((tl.maximum(dn, 0.0) if CLAMP else dn) + eps)[:, None]
        tl.store(den + row_base + rows * H, dn, mask=rows < T)
    tl.store(o + offsets, acc.to(o.dtype.element_ty), mask=mask)
    if SAVE32:
        tl.store(o32 + offsets, acc, mask=mask)


@triton.jit
def dkdv_kernel(q, k, v, do, r, dd, ds, dz, dk, dv, table, H, D, V, scale, c0, c1, c2, a0, a1, a2,
                C: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
                NQ: tl.constexpr, G: tl.constexpr, SEL: tl.constexpr, NB: tl.constexpr, HAS0: tl.constexpr,
                HAS1: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    start, T, n, first, h = _entry(table)
    qk_base, v_base, row_base = (start * H + h) * D, (start * H + h) * V, start * H + h
    cols = n * BN + tl.arange(0, BN)
    c = (n * BN) // C
    cd, cv = tl.arange(0, BD), tl.arange(0, BV)
    kt = load_tile(k + qk_base, cols, cd, T, H * D, D)
    vt = load_tile(v + v_base, cols, cv, T, H * V, V)
    dkt = tl.zeros([BN, BD], tl.float32)
    dvt = tl.zeros([BN, BV], tl.float32)
    for start in range((n * BN // BM) * BM, tl.minimum((c + 1) * C, T), BM):  # this chunk's queries from the diagonal
        rows = start + tl.arange(0, BM)
        qt, dot, rt, ddt = query_terms(q, do, r, dd, qk_base, v_base, row_base, rows, cd, cv, T, H, D, V)
        p, dp = masked_scores(qt, kt, rows, cols, T, scale, c0, c1, c2, PREC, HAS0, HAS1)
        da = score_grads(dot, vt, rt, ddt, PREC)
        dvt += tl.dot(tl.trans((p * rt[:, None]).to(dot.dtype)), dot, input_precision=PREC)
        dkt += tl.dot(tl.trans((da * dp).to(qt.dtype)), qt, input_precision=PREC)
    kf, vf = kt.to(tl.float32), vt.to(tl.float32)
    # what later chunks (and the final state) send back through S: slot c + 1; square blocks G at a time
    for group in range(NQ // G):
        kg = _group_columns(k, qk_base, cols, group * G, T, H * D, D, G)
        s_off, z_off = _group_offsets(first + c + 1, h, group * G, H, NB, cv, G, BD, BV)
        grad = tl.load(ds + s_off).to(tl.float32)
        dvt += tl.dot(_group_features(kg, kf, group * G, a2, BN, G, BD, SEL, PREC), grad, input_precision=PREC)
        g_phi = tl.dot(vf, tl.trans(grad), input_precision=PREC) + tl.load(dz + z_off)[None, :]
        dkt += _group_feature_grad(g_phi, kg, kf, group * G, a2, BN, G, BD, SEL, PREC)
    valid = (cols < T).to(tl.float32)
    for j in range(NQ, NB):
        s_off, z_off = _state_offsets(first + c + 1, h, j, H, NB, cd, cv, BD, BV)
        grad = tl.load(ds + s_off).to(tl.float32)
        dvt += tl.dot(_block_features(kf, j, NQ, a0, a1, valid, cd, HAS1), grad, input_precision=PREC)
        g_phi = tl.dot(vf, tl.trans(grad), input_precision=PREC) + tl.load(dz + z_off)[None, :]
        dkt += _block_feature_grad(g_phi, j, NQ, a1, HAS1)
    mask = cols[:, None] < T
    tl.store(dk + qk_base + cols[:, None] * (H * D) + cd[None, :], dkt.to(dk.dtype.element_ty), mask=mask & (cd < D))
    tl.store(dv + v_base + cols[:, None] * (H * V) + cv[None, :], dvt.to(dv.dtype.element_ty), mask=mask & (cv < V))


@triton.jit
def dq_kernel(q, k, v, do, r, dd, s, z, dq, table, H, D, V, scale, c0, c1, c2, a0, a1, a2,
              C: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
              NQ: tl.constexpr, G: tl.constexpr, SEL: tl.constexpr, NB: tl.constexpr, HAS0: tl.constexpr,
              HAS1: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    start, T, m, first, h = _entry(table)
    qk_base, v_base, row_base = (start * H + h) * D, (start * H + h) * V, start * H + h
    rows = m * BM + tl.arange(0, BM)
    c = (m * BM) // C
    cd, cv = tl.arange(0, BD), tl.arange(0, BV)
    qt, dot, rt, ddt = query_terms(q, do, r, dd, qk_base, v_base, row_base, rows, cd, cv, T, H, D, V)
    dqt = tl.zeros([BM, BD], tl.float32)
    for start in range(c * C, tl.minimum((m + 1) * BM, T), BN):
        cols = start + tl.arange(0, BN)
        kt = load_tile(k + qk_base, cols, cd, T, H * D, D)
        vt = load_tile(v + v_base, cols, cv, T, H * V, V)
        _, dp = masked_scores(qt, kt, rows, cols, T, scale, c0, c1, c2, PREC, HAS0, HAS1)
        da = score_grads(dot, vt, rt, ddt, PREC)
        dqt += tl.dot((da * dp).to(kt.dtype), kt, input_precision=PREC)
    qf = qt.to(tl.float32)
    g = dot.to(tl.float32) * rt[:, None]
    valid = (rows < T).to(tl.float32)
    for group in range(NQ // G):  # through the state before this chunk: square blocks G at a time
        qg = _group_columns(q, qk_base, rows, group * G, T, H * D, D, G)
        s_off, z_off = _group_offsets(first + c, h, group * G, H, NB, cv, G, BD, BV)
        g_phi = tl.dot(g, tl.trans(tl.load(s + s_off).to(tl.float32)), input_precision=PREC)
        g_phi += (ddt * rt)[:, None] * tl.load(z + z_off)[None, :]
        dqt += _group_feature_grad(g_phi * valid[:, None], qg, qf, group * G, a2, BM, G, BD, SEL, PREC)
    for j in range(NQ, NB):  # then the linear and constant blocks
        s_off, z_off = _state_offsets(first + c, h, j, H, NB, cd, cv, BD, BV)
        g_phi = tl.dot(g, tl.trans(tl.load(s + s_off).to(tl.float32)), input_precision=PREC)
        g_phi += (ddt * rt)[:, None] * tl.load(z + z_off)[None, :]
        dqt += _block_feature_grad(g_phi * valid[:, None], j, NQ, a1, HAS1)
    mask = (rows[:, None] < T) & (cd[None, :] < D)
    tl.store(dq + qk_base + rows[:, None] * (H * D) + cd[None, :], dqt.to(dq.dtype.element_ty), mask=mask)


CHUNK = 256  # tokens per chunk state on the GPU (see the module docstring for the trade)
SCAN_SLICE = 16  # value columns per scan program (BV is a power of two >= 16)
SCAN_UNROLL = 8  # state slots per step of the scan's sequential walk


@dataclass(frozen=True)
class Layout:
    """Block sizes and the feature-block split of one call."""

    chunk: int
    block: int  # BM = BN
    bd: int
    bv: int
    num_square: int  # NQ: BD square blocks (those past D hold zeros), or none
    num_blocks: int  # NB

    @classmethod
    def of(cls, head_dim: int, value_dim: int, poly: PolynomialArgs) -> Layout:
        chunk, block = (32, 16) if interpreting() else (CHUNK, 64)
        bd, bv = max(16, triton.next_power_of_2(head_dim)), max(16, triton.next_power_of_2(value_dim))
        square = bd if poly.c2 > 0 else 0
        blocks = square + (poly.c1 > 0) + (poly.c0 > 0)
        return cls(chunk, block, bd, bv, square, blocks)

    def constexprs(self) -> dict:
        return dict(C=self.chunk, BD=self.bd, BV=self.bv, NQ=self.num_square, NB=self.num_blocks)


class GroupTiles(NamedTuple):
    """One tiled kernel's launch for 16-bit inputs: features per square-block dot (G BD), warps, and whether
    the grouped square features come from 0/1 selector dots (2D only) or from [rows, G, BD] tiles."""

    features: int
    warps: int
    selectors: bool


# Per tiled kernel, for 16-bit inputs. The square blocks go G = features / BD at a time: one [rows, G BD] x
# [G BD, BV] dot against the state; G changes only each kernel's loop, not the states' layout. Only sets the
# GPU tests passed with go here: Triton 3.6 mis-compiles some [rows, G, BD] 3D tiles (dkdv and dq at 64:4 in
# the 3D form gave bf16 dq 17-37% off), and the interpreter cannot see that. output, dkdv and dq build their
# square features from selector dots; chunk_sums keeps the 3D form, where its selector dots cost it more than
# the rest of the kernel. Of the sets that passed, this one was the fastest on the H200.
TILE_CONFIGS = {
    "sums": GroupTiles(256, 8, selectors=False),
    "output": GroupTiles(256, 8, selectors=True),
    "dkdv": GroupTiles(64, 4, selectors=True),
    "dq": GroupTiles(64, 4, selectors=True),
}
# fp32 inputs: one square block per dot (G = 1, pure 2D), "ieee" dots (CHUNK_FP32_DOTS), 4 warps: the form the
# GPU tests passed at 1e-4 of float64; Triton 3.6's tf32x3 at 8 warps gave a wrong dq. fp32 is the accurate
# path, not the fast one.
FP32_WARPS = 4
CHUNK_FP32_DOTS = "ieee"


@dataclass(frozen=True)
class GroupLaunch:
    """A tiled kernel's launch options: G square blocks per dot, selector or 3D form, warps."""

    group: int
    selectors: bool
    warps: int

    def options(self) -> dict:
        return dict(G=self.group, SEL=self.selectors, num_warps=self.warps)

    def step_downs(self) -> list[GroupLaunch]:
        """This launch, then with half as many square blocks per dot, down to one: for dims where the tuned
        launch needs more shared memory than the GPU has (the output kernel's 256 features a dot at q/k 32 on
        the H200). G changes only the loop, not the states' layout."""
        groups = [self.group >> shift for shift in range(self.group.bit_length())]
        return [GroupLaunch(group, self.selectors and group > 1, self.warps) for group in groups]


def tile_launch(name: str, layout: Layout, dtype: torch.dtype) -> GroupLaunch:
    """Tiled kernel `name`'s launch at this layout and input dtype (TILE_CONFIGS, or fp32's one block a dot)."""
    config = TILE_CONFIGS[name]
    features, warps = (layout.bd, FP32_WARPS) if dtype == torch.float32 else (config.features, config.warps)
    group = min(layout.bd, max(1, features // layout.bd))
    return GroupLaunch(group, config.selectors and group > 1, warps)


def _launch_tiled(name: str, kernel, grid: tuple, layout: Layout, dtype: torch.dtype, *args, **kwargs) -> None:
    """Launch tiled kernel `name` at its tile_launch or the first of its step_downs that fits the GPU."""
    compiled_with = {key: value for key, value in kwargs.items() if not isinstance(value, float)}
    launch_fitting(name, tile_launch(name, layout, dtype).step_downs(),
                   lambda rung: kernel[grid](*args, **kwargs, **rung.options()),
                   dtype=dtype, layout=layout, **compiled_with)  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """Where every program works, for N sequences packed along the token axis (a dense batch is B sequences
    of T): int32 tables of (sequence start, length, chunk or row-block index, the sequence's first slot).
    Sequence n owns count_n + 1 state slots from first_n: the initial state, then the state after each of its
    count_n = ceil(length_n / C) chunks (the last is the final state)."""

    chunks: Tensor  # [sum count_n, 4], one row per chunk (chunk_sums)
    blocks: Tensor  # [sum ceil(length_n / BM), 4], one row per row block (output, dq, dkdv)
    seqs: Tensor  # [N, 2]: first slot, chunk count (scan)
    first: Tensor  # int64 [N]: each sequence's initial-state slot
    last: Tensor  # int64 [N]: each sequence's final-state slot
    slots: int


@cached_when_dense
def plan_for(sequences: Sequences, chunk: int, block: int, device: torch.device) -> Plan:
    """The chunk kernels' Plan for these sequences, on the device."""
    starts, lengths = sequences.bounds()
    counts = (lengths + chunk - 1) // chunk
    first = (counts + 1).cumsum(0) - (counts + 1)

    def table(size: int) -> Tensor:
        return program_table(starts, lengths, size, first_slots=first).to(device).contiguous()

    seqs = torch.stack([first, counts], 1).to(device=device, dtype=torch.int32).contiguous()
    slots = int((counts + 1).sum())
    return Plan(table(chunk), table(block), seqs, first.to(device), (first + counts).to(device), slots)


def _to_blocks(kv: Tensor, ksum: Tensor, d: int, poly: PolynomialArgs, layout: Layout) -> tuple[Tensor, Tensor]:
    """LinearAttentionState's rows [const | linear d | square d*d] -> blocks [N, H, NB, BD, BV], [N, H, NB, BD]."""
    batch, heads, _, value_dim = kv.shape
    s = kv.new_zeros(batch, heads, layout.num_blocks, layout.bd, layout.bv)
    z = ksum.new_zeros(batch, heads, layout.num_blocks, layout.bd)
    row, block = 0, layout.num_blocks - 1
    if poly.c0 > 0:  # the constant block is the last one; its feature sits in row 0
        s[:, :, block, 0, :value_dim], z[:, :, block, 0] = kv[:, :, 0], ksum[:, :, 0]
        row, block = 1, block - 1
    if poly.c1 > 0:
        s[:, :, block, :d, :value_dim], z[:, :, block, :d] = kv[:, :, row : row + d], ksum[:, :, row : row + d]
        row += d
    if poly.c2 > 0:
        s[:, :, :d, :d, :value_dim] = kv[:, :, row:].unflatten(2, (d, d))
        z[:, :, :d, :d] = ksum[:, :, row:].unflatten(2, (d, d))
    return s, z


def _from_blocks(s: Tensor, z: Tensor, head_dim: int, value_dim: int, poly: PolynomialArgs) -> tuple[Tensor, Tensor]:
    """The inverse of _to_blocks: [N, H, NB, BD, BV], [N, H, NB, BD] -> kv [N, H, F, V], k_sum [N, H, F] (fp32)."""
    kv, ksum, block = [], [], s.shape[2] - 1
    if poly.c0 > 0:
        kv.append(s[:, :, block, :1, :value_dim])
        ksum.append(z[:, :, block, :1])
        block -= 1
    if poly.c1 > 0:
        kv.append(s[:, :, block, :head_dim, :value_dim])
        ksum.append(z[:, :, block, :head_dim])
    if poly.c2 > 0:
        kv.append(s[:, :, :head_dim, :head_dim, :value_dim].flatten(2, 3))
        ksum.append(z[:, :, :head_dim, :head_dim].flatten(2, 3))
    return torch.cat(kv, 2).float().contiguous(), torch.cat(ksum, 2).float().contiguous()


def _tile_args(poly: PolynomialArgs, layout: Layout, prec: str) -> dict:
    """The row-block kernels' (output, dq, dkdv) polynomial and block arguments."""
    return dict(**poly.score_args(), **poly.feature_args(), **layout.constexprs(), BM=layout.block,
                BN=layout.block, PREC=prec)  # fmt: skip


class ChunkStatesFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kv0, ksum0, plan: Plan, poly: PolynomialArgs, output_final_state: bool, normalize: bool,
                eps: float, for_backward: bool):  # fmt: skip
        """q, k [tokens, H, D], v [tokens, H, V] (the sequences packed); states [N, H, F, V], [N, H, F]."""
        heads, head_dim, value_dim = q.shape[1], q.shape[2], v.shape[2]
        layout = Layout.of(head_dim, value_dim, poly)
        nb, prec, sequences = layout.num_blocks, dot_precision(q.dtype, CHUNK_FP32_DOTS), len(plan.first)
        s = q.new_empty(plan.slots, heads, nb, layout.bd, layout.bv, dtype=torch.float32)
        z = q.new_empty(plan.slots, heads, nb, layout.bd, dtype=torch.float32)
        if kv0 is None:  # each sequence's first slot: its initial state; the others: each chunk's own sums,
            s[plan.first], z[plan.first] = 0.0, 0.0  # which the scan turns into the state after each chunk
        else:
            s0, z0 = _to_blocks(kv0, ksum0, head_dim, poly, layout)
            s[plan.first], z[plan.first] = s0, z0
        if len(plan.chunks):  # (no r, dd in the forward: v stands in for them)
            _launch_tiled(
                "sums", chunk_sums_kernel, (len(plan.chunks), heads), layout, q.dtype,
                k, v, v, v, s, z, plan.chunks, heads, head_dim, value_dim, **poly.feature_args(), SHIFT=1,
                **layout.constexprs(), BC=layout.block, HAS1=poly.c1 > 0, GRAD=False, PREC=prec,
            )  # fmt: skip
        if sequences:
            scan_kernel[(nb * layout.bv // SCAN_SLICE, sequences, heads)](
                s, z, plan.seqs, heads, BD=layout.bd, BV=layout.bv, SV=SCAN_SLICE, U=SCAN_UNROLL, REVERSE=False
            )
        o = torch.empty_like(v)
        save32 = for_backward and v.dtype != torch.float32
        o32 = torch.empty(v.shape, dtype=torch.float32, device=v.device) if save32 else o
        den = q.new_empty(q.shape[0], heads, dtype=torch.float32)
        if len(plan.blocks):
            _launch_tiled(
                "output", output_kernel, (len(plan.blocks), heads), layout, q.dtype,
                q, k, v, s, z, o, o32, den, plan.blocks, heads, head_dim, value_dim, eps=eps,
                **_tile_args(poly, layout, prec), NORMALIZE=normalize, CLAMP=poly.clamp, SAVE32=save32,
            )  # fmt: skip
        final = (None, None)
        if output_final_state:
            final = _from_blocks(s[plan.last], z[plan.last], head_dim, value_dim, poly)
        ctx.save_for_backward(q, k, v, o32, den, s, z)
        ctx.poly, ctx.normalize, ctx.eps, ctx.layout, ctx.plan = poly, normalize, eps, layout, plan
        ctx.has_init = kv0 is not None
        return o, final[0], final[1]

    @staticmethod
    def backward(ctx, do, d_kv, d_ksum):
        q, k, v, o, den, s, z = ctx.saved_tensors
        poly, layout, plan = ctx.poly, ctx.layout, ctx.plan
        heads, head_dim, value_dim = q.shape[1], q.shape[2], v.shape[2]
        nb, prec, sequences = layout.num_blocks, dot_precision(q.dtype, CHUNK_FP32_DOTS), len(plan.first)
        do = do.to(v.dtype).contiguous()
        r, dd = backward_row_terms(do, o, den, poly.clamp, ctx.normalize, ctx.eps)
        # each sequence's last slot: the final state's gradient; slot first + c: chunk c's own phi(Q)^T g.
        # Suffix sums then leave at first + c + 1 what chunk c's keys send back (later chunks and the final
        # state), and at the first slot the initial state's gradient.
        ds, dz = torch.empty_like(s), torch.empty_like(z)
        if d_kv is None and d_ksum is None:
            ds[plan.last], dz[plan.last] = 0.0, 0.0
        else:
            feat = feature_dim(head_dim, poly.kernel())
            d_kv = torch.zeros(sequences, heads, feat, value_dim, device=q.device) if d_kv is None else d_kv.float()
            d_ksum = torch.zeros(sequences, heads, feat, device=q.device) if d_ksum is None else d_ksum.float()
            ds_final, dz_final = _to_blocks(d_kv, d_ksum, head_dim, poly, layout)
            ds[plan.last], dz[plan.last] = ds_final, dz_final
        if len(plan.chunks):
            _launch_tiled(
                "sums", chunk_sums_kernel, (len(plan.chunks), heads), layout, q.dtype,
                q, do, r, dd, ds, dz, plan.chunks, heads, head_dim, value_dim, **poly.feature_args(),
                SHIFT=0, **layout.constexprs(), BC=layout.block, HAS1=poly.c1 > 0, GRAD=True, PREC=prec,
            )  # fmt: skip
        if sequences:
            scan_kernel[(nb * layout.bv // SCAN_SLICE, sequences, heads)](
                ds, dz, plan.seqs, heads, BD=layout.bd, BV=layout.bv, SV=SCAN_SLICE, U=SCAN_UNROLL, REVERSE=True
            )
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if len(plan.blocks):
            args = dict(H=heads, D=head_dim, V=value_dim, **_tile_args(poly, layout, prec))
            grid = (len(plan.blocks), heads)
            _launch_tiled("dkdv", dkdv_kernel, grid, layout, q.dtype, q, k, v, do, r, dd, ds, dz, dk, dv, plan.blocks,
                          **args)  # fmt: skip
            _launch_tiled("dq", dq_kernel, grid, layout, q.dtype, q, k, v, do, r, dd, s, z, dq, plan.blocks, **args)
        else:  # no tokens at all
            for grad in (dq, dk, dv):
                grad.zero_()
        d_init = (None, None)
        if ctx.has_init:
            d_init = _from_blocks(ds[plan.first], dz[plan.first], head_dim, value_dim, poly)
        return dq, dk, dv, d_init[0], d_init[1], None, None, None, None, None, None


def _refuse(q: Tensor, k: Tensor, v: Tensor) -> None:
    what = "chunk-states (backend='triton')"
    check_dtype_and_device(what, q, k, v)
    check_head_dims(what, q, v)
    if q.shape[2] > 65535:
        raise NotImplementedError(f"{what} covers up to 65535 heads, got {q.shape[2]}")


def _run(q, k, v, plan: Plan, kernel, initial_state, output_final_state, normalize, eps):
    """q, k, v [tokens, H, *] packed -> (o [tokens, H, V], final state or None)."""
    kv0 = ksum0 = None
    if initial_state is not None:
        kv0, ksum0 = (x.float().contiguous() for x in initial_state)
    for_backward = wants_gradients(*(x for x in (q, k, v, kv0, ksum0) if x is not None))
    o, kv, ksum = ChunkStatesFunction.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), kv0, ksum0, plan, PolynomialArgs.of(kernel), output_final_state,
        normalize, eps, for_backward,
    )  # fmt: skip
    return o, (LinearAttentionState(kv, ksum) if output_final_state else None)


def chunk_states_linear_attention(
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
    """The ("chunk", "triton") pair: the op contract's chunk mode through these kernels. q/k and value dims up
    to 128, any polynomial; chunk_size is the torch mode's knob (the kernels' chunk is CHUNK)."""
    del chunk_size
    _refuse(q, k, v)
    batch, length = q.shape[:2]
    layout = Layout.of(q.shape[-1], v.shape[-1], PolynomialArgs.of(kernel))
    plan = plan_for(Sequences(batch=batch, length=length), layout.chunk, layout.block, q.device)
    o, final = _run(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), plan, kernel, initial_state,
                    output_final_state, normalize, eps)  # fmt: skip
    return o.unflatten(0, (batch, length)), final


def packed_chunk_states_linear_attention(
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
    """cu_seqlens in one launch per kernel: the same kernels walk each sequence's chunks and state slots (a
    dense batch is B sequences of T). States have N rows."""
    del chunk_size
    _refuse(q, k, v)
    layout = Layout.of(q.shape[-1], v.shape[-1], PolynomialArgs.of(kernel))
    plan = plan_for(Sequences(cu_seqlens=cu_seqlens), layout.chunk, layout.block, q.device)
    o, final = _run(q[0], k[0], v[0], plan, kernel, initial_state, output_final_state, normalize, eps)
    return o.unsqueeze(0), final
