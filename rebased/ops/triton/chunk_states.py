"""Chunked linear attention with the chunk states in memory, one feature block at a time: Triton kernels.

    phi(x) = [a0, a1 x, a2 vec(x (x) x)]  (a_i^2 = c_i scale^i, as in chunk.py)
    S_c = S_0 + sum_{t < c C} phi(k_t) v_t^T       (the state chunk c's queries read)

The fused chunk kernel (chunk.py) walks the chunks of a sequence in one program and keeps the whole state
[F, BV] and a chunk's features [C, F] in registers: with F = 256 that spills (benchmarks/results/h200/README.md).
Here no program ever holds more than one feature block. phi splits into NB blocks of BD rows, each a
scalar times a D-vector, so a block costs one small dot:

    block j < NQ (= D with a square term):  a2 x_j x      block NQ (with a linear term):  a1 x
    the last block (with a constant term):   a0 e_0       (NB = NQ + [c1 > 0] + [c0 > 0])

Five kernels, O(T) work; all but the scan over chunk slots are independent programs:

    chunk_sums  program (chunk c, b h): chunk c's own phi(K_c)^T V_c (forward) or phi(Q_c)^T g_c
                (backward, g = do r, r = 1 / (den + eps))
    scan        program (block j, b h): in place, prefix sums over the slots make S_c, suffix sums the
                gradients dS_c = dS_final + sum_{c' > c} phi(Q_c')^T g_c' and the initial state's
    output      program (query block, b h): intra-chunk quadratic part (the parallel kernel's tiles) plus
                sum_j phi_j(q) S_c[j], then o = num / (den + eps)
    dq / dkdv   programs (row block, b h): the parallel kernel's intra-chunk tiles plus the state terms
                dq += d phi(q)^T (S_c g + z_c dd r),  dv += phi(k) dS_c,  dk += d phi(k)^T (dS_c v + dz_c)

The chunk states cost memory and bandwidth: NB x BD x BV fp32 per chunk and head, at C = 128 (ReBased, D 16,
V 64) 512 bytes a token and head, 1.6x what q, k, v and o take in bf16; a longer chunk halves that and
doubles the intra-chunk tiles (benchmarks/sweep_chunk_states.py times the trade). States are laid
out [B H, NC + 1, NB, BD, BV] (padded, so no masks); the caller converts initial and final states from and to
LinearAttentionState's feature rows. Dense batches only: cu_seqlens runs one call per sequence (ops.varlen).

Status: interpreter-tested against the float64 reference (tests/test_triton_ops.py); not yet compiled or
timed on a GPU, so ("chunk", "triton") still runs chunk.py's kernel. Shape letters as in chunk.py; BM, BN
row blocks (C a multiple of both), NB feature blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from rebased.ops.common import LinearAttentionState, feature_dim
from rebased.ops.kernels import Polynomial
from rebased.ops.triton.chunk import _rows, _scores
from rebased.ops.triton.functions import _Poly, _precision, check_dtype_and_device, interpreting
from rebased.ops.triton.parallel import _query_terms, _score_grads


@triton.jit
def _is_linear(j, NQ, HAS1: tl.constexpr):
    """Whether feature block j is the linear one (it follows the NQ square blocks, when there is one)."""
    return j == NQ if HAS1 else j < 0


@triton.jit
def _block_features(x, x_j, j, NQ, a0, a1, a2, valid, cd, HAS1: tl.constexpr):
    """phi's block j of each row of x [R, BD] (fp32): a2 x_j x, a1 x or a0 e_0 (x_j = x[:, j], read only for
    square blocks; rows that are not valid give 0)."""
    square, linear = j < NQ, _is_linear(j, NQ, HAS1)
    w = tl.where(square, a2 * x_j, tl.where(linear, a1, a0)) * valid
    base = tl.where(square | linear, x, (cd == 0).to(tl.float32)[None, :])
    return w[:, None] * base


@triton.jit
def _block_feature_grad(g, x, x_j, j, NQ, a1, a2, cd, HAS1: tl.constexpr):
    """d(g . phi_j(x)) / dx per row, g [R, BD] the gradient of the block: a2 (x_j g + (g . x) e_j), a1 g or 0."""
    square = a2 * (x_j[:, None] * g + tl.where(cd[None, :] == j, tl.sum(g * x, 1)[:, None], 0.0))
    return tl.where(j < NQ, square, tl.where(_is_linear(j, NQ, HAS1), a1 * g, 0.0))


@triton.jit
def _column(x, base, t, j, T, stride, NQ):
    """x[t, j] as fp32 [len(t)] for a square block (0 otherwise): the scalar of phi's block j."""
    square = t * 0 + j < NQ  # a vector mask: the interpreter refuses a scalar and a vector combined
    return tl.load(x + base + t * stride + j, mask=(t < T) & square, other=0.0).to(tl.float32)


@triton.jit
def _state_offsets(bh, c, j, NC, NB, cd, cv, BD: tl.constexpr, BV: tl.constexpr):
    """Offsets of block j of chunk slot c ([BD, BV] in s, [BD] in z) in a [B H, NC + 1, NB, BD, BV] layout."""
    slot = (bh.to(tl.int64) * (NC + 1) + c) * NB + j
    return slot * BD * BV + cd[:, None] * BV + cv[None, :], slot * BD + cd


@triton.jit
def chunk_sums_kernel(x, y, r, dd, s, z, T, H, D, V, NC, NQ, a0, a1, a2, SHIFT,
                      C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, NB: tl.constexpr, HAS1: tl.constexpr,
                      GRAD: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Chunk c's own sums, every feature block, into slot c + SHIFT of [B H, NC + 1, NB, BD, BV] / [.., BD]:
    forward  (GRAD=False): phi(K_c)^T V_c and phi(K_c)^T 1                       (x = k, y = v)
    backward (GRAD=True):  phi(Q_c)^T (do r)_c and phi(Q_c)^T (dd r)_c           (x = q, y = do)
    Every (chunk, b h) is its own program (the chunk's x and y are read once); the caller's cumulative sums
    over chunks make the states."""
    c, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    x_base, y_base = (b.to(tl.int64) * T * H + h) * D, (b.to(tl.int64) * T * H + h) * V
    cd, cv = tl.arange(0, BD), tl.arange(0, BV)
    t = c * C + tl.arange(0, C)
    valid = (t < T).to(tl.float32)
    xt = _rows(x + x_base, t, cd, T, H * D, D).to(tl.float32)
    yt = _rows(y + y_base, t, cv, T, H * V, V).to(tl.float32)
    w = valid
    if GRAD:
        rt = tl.load(r + (b.to(tl.int64) * T + t) * H + h, mask=t < T, other=0.0)
        yt = yt * rt[:, None]
        w = tl.load(dd + (b.to(tl.int64) * T + t) * H + h, mask=t < T, other=0.0) * rt
    for j in range(NB):
        phi = _block_features(xt, _column(x, x_base, t, j, T, H * D, NQ), j, NQ, a0, a1, a2, valid, cd, HAS1)
        s_off, z_off = _state_offsets(bh, c + SHIFT, j, NC, NB, cd, cv, BD, BV)
        tl.store(s + s_off, tl.dot(tl.trans(phi), yt, input_precision=PREC).to(s.dtype.element_ty))
        tl.store(z + z_off, tl.sum(phi * w[:, None], 0))


@triton.jit
def scan_kernel(s, NC, BD: tl.constexpr, BV: tl.constexpr, REVERSE: tl.constexpr):
    """In place along the NC + 1 slots of block (program_id 0) of (b h = program_id 1): prefix sums, or suffix
    sums with REVERSE. One read and one write of the states (torch's flip-cumsum-flip moves them three times)."""
    j, bh, NB = tl.program_id(0), tl.program_id(1), tl.num_programs(0)
    cd, cv = tl.arange(0, BD), tl.arange(0, BV)
    acc = tl.zeros([BD, BV], tl.float32)
    for i in range(NC + 1):
        c = NC - i if REVERSE else i
        s_off, _z_off = _state_offsets(bh, c, j, NC, NB, cd, cv, BD, BV)
        acc += tl.load(s + s_off).to(tl.float32)  # (sums in fp32 whatever the slots hold)
        tl.store(s + s_off, acc.to(s.dtype.element_ty))


@triton.jit
def output_kernel(q, k, v, s, z, o, o32, den, T, H, D, V, NC, NQ, scale, c0, c1, c2, a0, a1, a2, eps,
                  C: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
                  NB: tl.constexpr, HAS0: tl.constexpr, HAS1: tl.constexpr, NORMALIZE: tl.constexpr,
                  CLAMP: tl.constexpr, SAVE32: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    qk_base, v_base = (b.to(tl.int64) * T * H + h) * D, (b.to(tl.int64) * T * H + h) * V
    rows = m * BM + tl.arange(0, BM)
    c = (m * BM) // C
    cd, cv = tl.arange(0, BD), tl.arange(0, BV)
    qt = _rows(q + qk_base, rows, cd, T, H * D, D)
    acc = tl.zeros([BM, BV], tl.float32)
    dn = tl.zeros([BM], tl.float32)
    for start in range(c * C, tl.minimum((m + 1) * BM, T), BN):  # this chunk's keys up to the diagonal
        cols = start + tl.arange(0, BN)
        kt = _rows(k + qk_base, cols, cd, T, H * D, D)
        vt = _rows(v + v_base, cols, cv, T, H * V, V)
        p, _ = _scores(qt, kt, rows, cols, T, scale, c0, c1, c2, PREC, HAS0, HAS1)
        p = p.to(vt.dtype)  # the normaliser sums the same rounded scores (parallel.py says why)
        dn += tl.sum(p.to(tl.float32), 1)
        acc += tl.dot(p, vt, input_precision=PREC)
    qf = qt.to(tl.float32)
    valid = (rows < T).to(tl.float32)
    for j in range(NB):  # the state before this chunk, one feature block at a time
        s_off, z_off = _state_offsets(bh, c, j, NC, NB, cd, cv, BD, BV)
        phi = _block_features(qf, _column(q, qk_base, rows, j, T, H * D, NQ), j, NQ, a0, a1, a2, valid, cd, HAS1)
        acc += tl.dot(phi, tl.load(s + s_off).to(tl.float32), input_precision=PREC)
        dn += tl.sum(phi * tl.load(z + z_off)[None, :], 1)
    offsets = v_base + rows[:, None] * (H * V) + cv[None, :]
    mask = (rows[:, None] < T) & (cv[None, :] < V)
    if NORMALIZE:
        acc = acc / ((tl.maximum(dn, 0.0) if CLAMP else dn) + eps)[:, None]
        tl.store(den + (b.to(tl.int64) * T + rows) * H + h, dn, mask=rows < T)
    tl.store(o + offsets, acc.to(o.dtype.element_ty), mask=mask)
    if SAVE32:
        tl.store(o32 + offsets, acc, mask=mask)


@triton.jit
def dkdv_kernel(q, k, v, do, r, dd, ds, dz, dk, dv, T, H, D, V, NC, NQ, scale, c0, c1, c2, a0, a1, a2,
                C: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
                NB: tl.constexpr, HAS0: tl.constexpr, HAS1: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    qk_base, v_base = (b.to(tl.int64) * T * H + h) * D, (b.to(tl.int64) * T * H + h) * V
    row_base = b.to(tl.int64) * T * H + h  # the slot of (b, t = 0, h) in the per-row [B T, H] terms
    cols = n * BN + tl.arange(0, BN)
    c = (n * BN) // C
    cd, cv = tl.arange(0, BD), tl.arange(0, BV)
    kt = _rows(k + qk_base, cols, cd, T, H * D, D)
    vt = _rows(v + v_base, cols, cv, T, H * V, V)
    dkt = tl.zeros([BN, BD], tl.float32)
    dvt = tl.zeros([BN, BV], tl.float32)
    for start in range((n * BN // BM) * BM, tl.minimum((c + 1) * C, T), BM):  # this chunk's queries from the diagonal
        rows = start + tl.arange(0, BM)
        qt, dot, rt, ddt = _query_terms(q, do, r, dd, qk_base, v_base, row_base, rows, cd, cv, T, H, D, V)
        p, dp = _scores(qt, kt, rows, cols, T, scale, c0, c1, c2, PREC, HAS0, HAS1)
        da = _score_grads(dot, vt, rt, ddt, PREC)
        dvt += tl.dot(tl.trans((p * rt[:, None]).to(dot.dtype)), dot, input_precision=PREC)
        dkt += tl.dot(tl.trans((da * dp).to(qt.dtype)), qt, input_precision=PREC)
    kf, vf = kt.to(tl.float32), vt.to(tl.float32)
    valid = (cols < T).to(tl.float32)
    for j in range(NB):  # what later chunks (and the final state) send back through S: slot c + 1
        s_off, z_off = _state_offsets(bh, c + 1, j, NC, NB, cd, cv, BD, BV)
        k_j = _column(k, qk_base, cols, j, T, H * D, NQ)
        phi = _block_features(kf, k_j, j, NQ, a0, a1, a2, valid, cd, HAS1)
        grad = tl.load(ds + s_off).to(tl.float32)
        dvt += tl.dot(phi, grad, input_precision=PREC)
        g_phi = tl.dot(vf, tl.trans(grad), input_precision=PREC) + tl.load(dz + z_off)[None, :]
        dkt += _block_feature_grad(g_phi, kf, k_j, j, NQ, a1, a2, cd, HAS1)
    mask = cols[:, None] < T
    tl.store(dk + qk_base + cols[:, None] * (H * D) + cd[None, :], dkt.to(dk.dtype.element_ty), mask=mask & (cd < D))
    tl.store(dv + v_base + cols[:, None] * (H * V) + cv[None, :], dvt.to(dv.dtype.element_ty), mask=mask & (cv < V))


@triton.jit
def dq_kernel(q, k, v, do, r, dd, s, z, dq, T, H, D, V, NC, NQ, scale, c0, c1, c2, a0, a1, a2,
              C: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
              NB: tl.constexpr, HAS0: tl.constexpr, HAS1: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    qk_base, v_base = (b.to(tl.int64) * T * H + h) * D, (b.to(tl.int64) * T * H + h) * V
    row_base = b.to(tl.int64) * T * H + h  # the slot of (b, t = 0, h) in the per-row [B T, H] terms
    rows = m * BM + tl.arange(0, BM)
    c = (m * BM) // C
    cd, cv = tl.arange(0, BD), tl.arange(0, BV)
    qt, dot, rt, ddt = _query_terms(q, do, r, dd, qk_base, v_base, row_base, rows, cd, cv, T, H, D, V)
    dqt = tl.zeros([BM, BD], tl.float32)
    for start in range(c * C, tl.minimum((m + 1) * BM, T), BN):
        cols = start + tl.arange(0, BN)
        kt = _rows(k + qk_base, cols, cd, T, H * D, D)
        vt = _rows(v + v_base, cols, cv, T, H * V, V)
        _, dp = _scores(qt, kt, rows, cols, T, scale, c0, c1, c2, PREC, HAS0, HAS1)
        da = _score_grads(dot, vt, rt, ddt, PREC)
        dqt += tl.dot((da * dp).to(kt.dtype), kt, input_precision=PREC)
    qf = qt.to(tl.float32)
    g = dot.to(tl.float32) * rt[:, None]
    valid = (rows < T).to(tl.float32)
    for j in range(NB):  # through the state before this chunk
        s_off, z_off = _state_offsets(bh, c, j, NC, NB, cd, cv, BD, BV)
        q_j = _column(q, qk_base, rows, j, T, H * D, NQ)
        g_phi = tl.dot(g, tl.trans(tl.load(s + s_off).to(tl.float32)), input_precision=PREC)
        g_phi += (ddt * rt)[:, None] * tl.load(z + z_off)[None, :]
        dqt += _block_feature_grad(g_phi * valid[:, None], qf, q_j, j, NQ, a1, a2, cd, HAS1)
    mask = (rows[:, None] < T) & (cd[None, :] < D)
    tl.store(dq + qk_base + rows[:, None] * (H * D) + cd[None, :], dqt.to(dq.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class Layout:
    """Block sizes and the feature-block split of one call."""

    chunk: int
    block: int  # BM = BN
    bd: int
    bv: int
    num_square: int  # NQ
    num_blocks: int  # NB

    @classmethod
    def of(cls, head_dim: int, value_dim: int, poly: _Poly) -> Layout:
        chunk, block = (32, 16) if interpreting() else (CHUNK, 64)
        square = head_dim if poly.c2 > 0 else 0
        blocks = square + (poly.c1 > 0) + (poly.c0 > 0)
        bd, bv = max(16, triton.next_power_of_2(head_dim)), max(16, triton.next_power_of_2(value_dim))
        return cls(chunk, block, bd, bv, square, blocks)

    def constexprs(self) -> dict:
        return dict(C=self.chunk, BD=self.bd, BV=self.bv)


CHUNK = 128  # tokens per chunk state on the GPU (see the module docstring for the trade)
# The chunk states' storage (kv rows; the normaliser rows stay fp32). bf16 halves the states' memory traffic
# and rounds each chunk's sums once (2^-9); whether that keeps the 1% gradient bound is a GPU test's to say,
# so fp32 until then (benchmarks/sweep_chunk_states.py times both).
STATE_DTYPE = torch.float32


def _to_blocks(kv: Tensor, ksum: Tensor, poly: _Poly, layout: Layout) -> tuple[Tensor, Tensor]:
    """LinearAttentionState's rows [const | linear D | square D*D] -> blocks [B H, NB, BD, BV], [B H, NB, BD]."""
    batch, heads, _, value_dim = kv.shape
    d = layout.num_square or (kv.shape[2] - (poly.c0 > 0))  # the linear block's width without a square term
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
        n = layout.num_square
        s[:, :, :n, :n, :value_dim] = kv[:, :, row:].unflatten(2, (n, n))
        z[:, :, :n, :n] = ksum[:, :, row:].unflatten(2, (n, n))
    return s.flatten(0, 1), z.flatten(0, 1)


def _from_blocks(s: Tensor, z: Tensor, batch: int, head_dim: int, value_dim: int, poly: _Poly) -> tuple[Tensor, Tensor]:
    """The inverse of _to_blocks: [B H, NB, BD, BV], [B H, NB, BD] -> kv [B, H, F, V], k_sum [B, H, F]."""
    s, z = s.unflatten(0, (batch, -1)), z.unflatten(0, (batch, -1))
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


def _suffix_sums(x: Tensor) -> Tensor:
    """Along dim 1: slot c becomes the sum of slots c..end."""
    return x.flip(1).cumsum(1).flip(1)


def _scalars(poly: _Poly, layout: Layout) -> dict:
    scale, c0, c1, c2, a0, a1, a2 = poly.args()
    return dict(NQ=layout.num_square, a0=a0, a1=a1, a2=a2)


class ChunkStatesFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kv0, ksum0, poly: _Poly, output_final_state: bool, normalize: bool, eps: float,
                for_backward: bool):  # fmt: skip
        batch, length, heads, head_dim = q.shape
        value_dim = v.shape[-1]
        layout = Layout.of(head_dim, value_dim, poly)
        chunks = triton.cdiv(length, layout.chunk)
        bh, nb = batch * heads, layout.num_blocks
        s = q.new_empty(bh, chunks + 1, nb, layout.bd, layout.bv, dtype=STATE_DTYPE)
        z = q.new_empty(bh, chunks + 1, nb, layout.bd, dtype=torch.float32)
        if kv0 is None:  # slot 0: the initial state; slots 1..NC: each chunk's own sums; their prefix sums
            s[:, 0], z[:, 0] = 0.0, 0.0  # are then the state before each chunk, and slot NC the final state
        else:
            s[:, 0], z[:, 0] = _to_blocks(kv0, ksum0, poly, layout)
        prec = _precision(q.dtype)
        if chunks:
            chunk_sums_kernel[(chunks, bh)](
                k, v, v, v, s, z, length, heads, head_dim, value_dim, chunks, **_scalars(poly, layout),  # (no r, dd)
                SHIFT=1, **layout.constexprs(), NB=nb, HAS1=poly.c1 > 0, GRAD=False, PREC=prec, num_warps=4,
            )  # fmt: skip
        scan_kernel[(nb, bh)](s, chunks, BD=layout.bd, BV=layout.bv, REVERSE=False, num_warps=4)
        z.cumsum_(1)  # (z is a BV-th of s: torch is fine)
        o = torch.empty_like(v)
        save32 = for_backward and v.dtype != torch.float32
        o32 = torch.empty(v.shape, dtype=torch.float32, device=v.device) if save32 else o
        den = q.new_empty(batch * length, heads, dtype=torch.float32)
        output_kernel[(max(1, triton.cdiv(length, layout.block)), bh)](  # (an empty sequence: all rows masked)
            q, k, v, s, z, o, o32, den, length, heads, head_dim, value_dim, chunks, layout.num_square,
            poly.scale, poly.c0, poly.c1, poly.c2, *poly.args()[4:], eps, **layout.constexprs(), BM=layout.block,
            BN=layout.block, NB=nb, HAS0=poly.c0 > 0, HAS1=poly.c1 > 0, NORMALIZE=normalize, CLAMP=poly.clamp,
            SAVE32=save32, PREC=prec, num_warps=4,
        )  # fmt: skip
        final = (None, None)
        if output_final_state:
            final = _from_blocks(s[:, chunks], z[:, chunks], batch, head_dim, value_dim, poly)
        ctx.save_for_backward(q, k, v, o32, den, s, z)
        ctx.poly, ctx.normalize, ctx.eps, ctx.layout, ctx.has_init = poly, normalize, eps, layout, kv0 is not None
        return o, final[0], final[1]

    @staticmethod
    def backward(ctx, do, d_kv, d_ksum):
        from rebased.ops.triton.parallel import _row_terms, _row_terms_fused

        q, k, v, o, den, s, z = ctx.saved_tensors
        poly, layout = ctx.poly, ctx.layout
        batch, length, heads, head_dim = q.shape
        value_dim, chunks, bh, nb = v.shape[-1], s.shape[1] - 1, batch * heads, layout.num_blocks
        do = do.to(v.dtype).contiguous()
        if ctx.normalize:
            r, dd = _row_terms_fused(do, o, den, poly.clamp, ctx.eps)
        else:
            r, dd = _row_terms(do, o, den, poly.clamp, False, ctx.eps)
        use_final = d_kv is not None or d_ksum is not None
        if use_final:
            feat = feature_dim(head_dim, poly.kernel())
            d_kv = torch.zeros(batch, heads, feat, value_dim, device=q.device) if d_kv is None else d_kv.float()
            d_ksum = torch.zeros(batch, heads, feat, device=q.device) if d_ksum is None else d_ksum.float()
        # slot c: chunk c's own phi(Q)^T g; slot NC: the final state's gradient. Suffix sums then give, at slot
        # c + 1, what chunk c's keys send back (later chunks and the final state), and at slot 0 the initial
        # state's gradient.
        ds, dz = torch.empty_like(s), torch.empty_like(z)
        if use_final:
            ds[:, chunks], dz[:, chunks] = _to_blocks(d_kv, d_ksum, poly, layout)
        else:
            ds[:, chunks], dz[:, chunks] = 0.0, 0.0
        prec = _precision(q.dtype)
        if chunks:
            chunk_sums_kernel[(chunks, bh)](
                q, do, r, dd, ds, dz, length, heads, head_dim, value_dim, chunks, **_scalars(poly, layout),
                SHIFT=0, **layout.constexprs(), NB=nb, HAS1=poly.c1 > 0, GRAD=True, PREC=prec, num_warps=4,
            )  # fmt: skip
        scan_kernel[(nb, bh)](ds, chunks, BD=layout.bd, BV=layout.bv, REVERSE=True, num_warps=4)
        dz = _suffix_sums(dz)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        args = dict(
            T=length, H=heads, D=head_dim, V=value_dim, NC=chunks, scale=poly.scale, c0=poly.c0, c1=poly.c1,
            c2=poly.c2, **_scalars(poly, layout), **layout.constexprs(), BM=layout.block, BN=layout.block, NB=nb,
            HAS0=poly.c0 > 0, HAS1=poly.c1 > 0, PREC=prec, num_warps=8,  # 4 warps spill (compile_check.py)
        )  # fmt: skip
        grid = (max(1, triton.cdiv(length, layout.block)), bh)
        dkdv_kernel[grid](q, k, v, do, r, dd, ds, dz, dk, dv, **args)
        dq_kernel[grid](q, k, v, do, r, dd, s, z, dq, **args)
        d_init = (None, None)
        if ctx.has_init:
            d_init = _from_blocks(ds[:, 0], dz[:, 0], batch, head_dim, value_dim, poly)
        return dq, dk, dv, d_init[0], d_init[1], None, None, None, None, None


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
    """The op contract's chunk mode through these kernels (not registered as ("chunk", "triton") yet: see the
    module docstring). q/k and value dims up to 128, any polynomial; chunk_size is the torch mode's knob."""
    del chunk_size
    what = "chunk-states (backend='triton')"
    check_dtype_and_device(what, q, k, v)
    if q.shape[-1] > 128 or v.shape[-1] > 128:
        raise NotImplementedError(f"{what} covers q/k and value dims up to 128, got {q.shape[-1]}, {v.shape[-1]}")
    if q.shape[0] * q.shape[2] > 65535:  # batch x heads is the launch grid's second axis
        raise NotImplementedError(f"{what} covers batch x heads up to 65535, got {q.shape[0] * q.shape[2]}")
    kv0 = ksum0 = None
    if initial_state is not None:
        kv0, ksum0 = (x.float().contiguous() for x in initial_state)
    for_backward = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, kv0, ksum0) if x is not None)
    o, kv, ksum = ChunkStatesFunction.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), kv0, ksum0, _Poly.of(kernel), output_final_state,
        normalize, eps, for_backward,
    )  # fmt: skip
    return o, (LinearAttentionState(kv, ksum) if output_final_state else None)
