"""Tiled quadratic (parallel) linear attention for polynomial kernels: forward and backward Triton kernels.

The flash-attention schedule with sim = p(s) in place of exp and no running maximum (p is a polynomial:
nothing to overflow, so no rescaling). The T x T scores live only in registers, a tile at a time:

    s = scale q.k,  P = mask(p(s)),  den = P 1,  o = P V / (den + eps)                  (forward)

Backward, with r = 1 / (den + eps) and dd = -(do . o) per query row (one pass over do and the saved o and den,
parallel_row_terms_kernel; its torch twin is row_terms_torch):

    dA = (do V^T + dd 1^T) * r;   dS = dA * p'(s) * scale  (masked);   dq = dS K;   dk = dS^T Q;   dv = (P r)^T do

do v_j + dd = do . (v_j - o) cancels where v_j is close to o (exactly at t = 0, where o_0 = v_0 and dq_0 = 0)
while r is large there (ReBased's normaliser can be ~1e-4), so both terms must be fp32-accurate: o is kept
in fp32 for the backward, the forward's normaliser sums the same rounded scores its numerator uses, and the
do V^T dot takes do and v as they are (bf16 products are exact in fp32, summed in fp32), scaling by r only
afterwards. Rounding any of these in bf16 lost the first positions' dq entirely.

One program owns a block of query rows (forward, dq) or of key rows (dk, dv) of one (sequence, head) and
loops over the other side's blocks up to the causal diagonal. Work is O(T^2 (D + V)), memory O(T): the
fastest path at short and moderate T, where the chunk kernel's feature-space state (D^2 x V per chunk)
costs more than the tiles it saves. Programs find their block in a table of (sequence start, length,
block index) rows, so a dense batch (B sequences of T, the same memory layout) and a packed variable-length
one (cu_seqlens) run the same kernels; the table launches the longest blocks first to shorten the tail.

Shape letters: B batch, T time, H heads, D q/k dim (BD padded), V value dim (BV padded), M/N row blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from rebased.ops.common import LinearAttentionState, features
from rebased.ops.kernels import Polynomial
from rebased.ops.triton.inputs import PolynomialArgs, check_dtype_and_device, check_head_dims, wants_gradients
from rebased.ops.triton.launch import dot_precision, interpreting, launch_fitting
from rebased.ops.triton.sequences import Sequences, cached_when_dense, program_table
from rebased.ops.triton.tiles import load_tile, masked_scores, query_terms, score_grads


@triton.jit
def _block(table, H, D, V):
    """This program's row block: table row program_id(0) holds (sequence start, sequence length, block index);
    program axis 1 is the head. Returns the block index, the length T, the offsets of (start, h) in q/k and
    in v ([tokens, H, D] and [tokens, H, V]), and the first per-row slot (start, h) in [tokens, H]."""
    row = table + tl.program_id(0) * 3
    start, length, block = tl.load(row).to(tl.int64), tl.load(row + 1), tl.load(row + 2)
    h = tl.program_id(1)
    return block, length, (start * H + h) * D, (start * H + h) * V, start * H + h


@triton.jit
def parallel_fwd_kernel(q, k, v, o, o32, den, table, H, D, V, scale, c0, c1, c2, eps,
                        BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
                        HAS0: tl.constexpr, HAS1: tl.constexpr, NORMALIZE: tl.constexpr, CLAMP: tl.constexpr,
                        SAVE32: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """o in the inputs' dtype and, with SAVE32, an fp32 copy in o32 for the backward's dd (writing both
    costs less than writing fp32 and casting it afterwards; inference writes o alone)."""
    m, T, qk_base, v_base, row_base = _block(table, H, D, V)
    rows = m * BM + tl.arange(0, BM)
    cd, cv = tl.arange(0, BD), tl.arange(0, BV)
    qt = load_tile(q + qk_base, rows, cd, T, H * D, D)
    acc = tl.zeros([BM, BV], tl.float32)
    z = tl.zeros([BM], tl.float32)
    for start in range(0, tl.minimum((m + 1) * BM, T), BN):
        cols = start + tl.arange(0, BN)
        kt = load_tile(k + qk_base, cols, cd, T, H * D, D)
        vt = load_tile(v + v_base, cols, cv, T, H * V, V)
        p, _ = masked_scores(qt, kt, rows, cols, T, scale, c0, c1, c2, PREC, HAS0, HAS1)
        p = p.to(vt.dtype)  # 16-bit scores for the tensor cores; the normaliser sums the same rounded values,
        z += tl.sum(p.to(tl.float32), 1)  # so o stays an exact weighted mean of v (o_0 = v_0)
        acc += tl.dot(p, vt, input_precision=PREC)
    if NORMALIZE:
        acc = acc / ((tl.maximum(z, 0.0) if CLAMP else z) + eps)[:, None]
        tl.store(den + row_base + rows * H, z, mask=rows < T)
    offsets = v_base + rows[:, None] * (H * V) + cv[None, :]
    mask = (rows[:, None] < T) & (cv[None, :] < V)
    tl.store(o + offsets, acc.to(o.dtype.element_ty), mask=mask)
    if SAVE32:  # the backward's dd needs o unrounded
        tl.store(o32 + offsets, acc, mask=mask)


@triton.jit
def parallel_dkdv_kernel(q, k, v, do, r, dd, dk, dv, table, H, D, V, scale, c0, c1, c2,
                         BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
                         HAS0: tl.constexpr, HAS1: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """dk, dv for one block of key rows: a walk over the query blocks at and after the diagonal."""
    n, T, qk_base, v_base, row_base = _block(table, H, D, V)
    cols = n * BN + tl.arange(0, BN)
    cd, cv = tl.arange(0, BD), tl.arange(0, BV)
    kt = load_tile(k + qk_base, cols, cd, T, H * D, D)
    vt = load_tile(v + v_base, cols, cv, T, H * V, V)
    dkt = tl.zeros([BN, BD], tl.float32)
    dvt = tl.zeros([BN, BV], tl.float32)
    for start in range((n * BN // BM) * BM, T, BM):
        rows = start + tl.arange(0, BM)
        qt, dot, rt, ddt = query_terms(q, do, r, dd, qk_base, v_base, row_base, rows, cd, cv, T, H, D, V)
        p, dp = masked_scores(qt, kt, rows, cols, T, scale, c0, c1, c2, PREC, HAS0, HAS1)  # [M, N]
        da = score_grads(dot, vt, rt, ddt, PREC)
        dvt += tl.dot(tl.trans((p * rt[:, None]).to(dot.dtype)), dot, input_precision=PREC)
        dkt += tl.dot(tl.trans((da * dp).to(qt.dtype)), qt, input_precision=PREC)
    mask = cols[:, None] < T
    tl.store(dk + qk_base + cols[:, None] * (H * D) + cd[None, :], dkt.to(dk.dtype.element_ty), mask=mask & (cd < D))
    tl.store(dv + v_base + cols[:, None] * (H * V) + cv[None, :], dvt.to(dv.dtype.element_ty), mask=mask & (cv < V))


@triton.jit
def parallel_dq_kernel(q, k, v, do, r, dd, dq, table, H, D, V, scale, c0, c1, c2,
                       BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
                       HAS0: tl.constexpr, HAS1: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """dq for one block of query rows: a walk over the key blocks up to the diagonal."""
    m, T, qk_base, v_base, row_base = _block(table, H, D, V)
    rows = m * BM + tl.arange(0, BM)
    cd, cv = tl.arange(0, BD), tl.arange(0, BV)
    qt, dot, rt, ddt = query_terms(q, do, r, dd, qk_base, v_base, row_base, rows, cd, cv, T, H, D, V)
    dqt = tl.zeros([BM, BD], tl.float32)
    for start in range(0, tl.minimum((m + 1) * BM, T), BN):
        cols = start + tl.arange(0, BN)
        kt = load_tile(k + qk_base, cols, cd, T, H * D, D)
        vt = load_tile(v + v_base, cols, cv, T, H * V, V)
        _, dp = masked_scores(qt, kt, rows, cols, T, scale, c0, c1, c2, PREC, HAS0, HAS1)
        da = score_grads(dot, vt, rt, ddt, PREC)
        dqt += tl.dot((da * dp).to(kt.dtype), kt, input_precision=PREC)
    mask = (rows[:, None] < T) & (cd[None, :] < D)
    tl.store(dq + qk_base + rows[:, None] * (H * D) + cd[None, :], dqt.to(dq.dtype.element_ty), mask=mask)


@triton.jit
def parallel_row_terms_kernel(do, o, den, r, dd, R, V, eps,
                              BR: tl.constexpr, BV: tl.constexpr, CLAMP: tl.constexpr):  # fmt: skip
    """r = 1 / (den + eps) and dd = -(do . o) for BR of the R = tokens x H query rows, in one pass over do and
    the fp32 o (torch would upcast do to an fp32 copy first); dd = 0 where a clamped den was negative."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cv = tl.arange(0, BV)
    offsets = rows[:, None].to(tl.int64) * V + cv[None, :]
    mask = (rows[:, None] < R) & (cv[None, :] < V)
    dot_t = tl.load(do + offsets, mask=mask, other=0.0).to(tl.float32)
    dot = tl.sum(dot_t * tl.load(o + offsets, mask=mask, other=0.0), axis=1)
    dn = tl.load(den + rows, mask=rows < R, other=1.0)
    if CLAMP:
        dot = tl.where(dn < 0, 0.0, dot)
        dn = tl.maximum(dn, 0.0)
    tl.store(r + rows, 1.0 / (dn + eps), mask=rows < R)
    tl.store(dd + rows, -dot, mask=rows < R)


@dataclass(frozen=True)
class TileConfig:
    """One kernel's launch: block_m query rows x block_n key rows per tile, warps, software-pipeline stages."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def step_downs(self) -> list[TileConfig]:
        """This launch, then with fewer software-pipeline stages (each holds a tile set in shared memory), then
        32 x 32 tiles at one stage: fp32 inputs at v dim 128 need more shared memory at 3 stages than the H200
        has."""
        fewer_stages = [replace(self, num_stages=stages) for stages in range(self.num_stages, 0, -1)]
        smaller_tiles = replace(self, block_m=min(self.block_m, 32), block_n=min(self.block_n, 32), num_stages=1)
        return [*fewer_stages, smaller_tiles]

    def options(self, head_dim: int, value_dim: int) -> dict:
        """The kernels' block constexprs and launch options."""
        return dict(BM=self.block_m, BN=self.block_n, BD=max(16, triton.next_power_of_2(head_dim)),
                    BV=max(16, triton.next_power_of_2(value_dim)), num_warps=self.num_warps,
                    num_stages=self.num_stages)  # fmt: skip


# (forward, dk/dv, dq) on the GPU: what the GPU tests passed with, and on the H200 the fastest or within a few
# percent of it for each kernel at the suite's and MQAR's shapes. Fixed rather than autotuned: the interpreter
# cannot autotune, and a new config must pass the GPU tests first.
GPU_CONFIGS = (TileConfig(num_stages=3), TileConfig(num_stages=3), TileConfig(num_stages=3))
# Under the interpreter: 16 x 16 tiles, so tiny test shapes still cross several blocks.
INTERPRETER_CONFIGS = (TileConfig(16, 16), TileConfig(16, 16), TileConfig(16, 16))
# fp32 inputs' dots: fp32-accurate (three tf32 products) on the tensor cores; a plain fp32 ("ieee") dot of these
# tiles spills tens of KiB a thread. The GPU tests bound fp32 at 1e-4 of float64 with it.
PARALLEL_FP32_DOTS = "tf32x3"


def launch_configs() -> tuple[TileConfig, TileConfig, TileConfig]:
    """(forward, dk/dv, dq) launches: the interpreter's small tiles or the GPU's."""
    return INTERPRETER_CONFIGS if interpreting() else GPU_CONFIGS


@cached_when_dense
def block_table(sequences: Sequences, block: int, longest_first: bool, device: torch.device) -> Tensor:
    """The programs' (sequence start, length, block index) rows for blocks of `block` rows, on the device:
    longest walks first for query blocks (longest_first), ascending for key blocks."""
    starts, lengths = sequences.bounds()
    return program_table(starts, lengths, block, longest_first=longest_first).to(device).contiguous()


def _kernel_args(q: Tensor, v: Tensor) -> tuple[int, int, int]:
    return q.shape[2], q.shape[3], v.shape[3]  # H, D, V


class ParallelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sequences: Sequences, poly: PolynomialArgs, normalize: bool, eps: float,
                for_backward: bool):  # fmt: skip
        """for_backward: gradients will be asked for (inputs.wants_gradients)."""
        heads, head_dim, value_dim = _kernel_args(q, v)
        o = torch.empty_like(v)
        save32 = for_backward and v.dtype != torch.float32
        o32 = torch.empty(v.shape, dtype=torch.float32, device=v.device) if save32 else o
        den = q.new_empty(q.shape[0] * q.shape[1], heads, dtype=torch.float32)  # [tokens, H]
        flags = dict(NORMALIZE=normalize, CLAMP=poly.clamp, SAVE32=save32,
                     PREC=dot_precision(q.dtype, PARALLEL_FP32_DOTS))  # fmt: skip

        def launch(cfg: TileConfig) -> None:
            table = block_table(sequences, cfg.block_m, True, q.device)
            parallel_fwd_kernel[(len(table), heads)](
                q, k, v, o, o32, den, table, heads, head_dim, value_dim, eps=eps, **poly.score_args(),
                **cfg.options(head_dim, value_dim), **flags,
            )  # fmt: skip

        fwd = launch_configs()[0]
        launch_fitting("parallel fwd", fwd.step_downs(), launch, dtype=q.dtype, dims=(head_dim, value_dim),
                       **poly.flags(), **flags)  # fmt: skip
        ctx.save_for_backward(q, k, v, o32, den)
        ctx.sequences, ctx.poly, ctx.normalize, ctx.eps = sequences, poly, normalize, eps
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, den = ctx.saved_tensors
        heads, head_dim, value_dim = _kernel_args(q, v)
        do = do.to(v.dtype).contiguous()
        r, dd = backward_row_terms(do, o, den, ctx.poly.clamp, ctx.normalize, ctx.eps)
        _, dkdv, dqc = launch_configs()
        prec = dot_precision(q.dtype, PARALLEL_FP32_DOTS)
        args = dict(**ctx.poly.score_args(), PREC=prec)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        sequences = ctx.sequences

        def launch_dkdv(cfg: TileConfig) -> None:
            table = block_table(sequences, cfg.block_n, False, q.device)
            parallel_dkdv_kernel[(len(table), heads)](
                q, k, v, do, r, dd, dk, dv, table, heads, head_dim, value_dim, **args,
                **cfg.options(head_dim, value_dim),
            )  # fmt: skip

        def launch_dq(cfg: TileConfig) -> None:
            table = block_table(sequences, cfg.block_m, True, q.device)
            parallel_dq_kernel[(len(table), heads)](
                q, k, v, do, r, dd, dq, table, heads, head_dim, value_dim, **args,
                **cfg.options(head_dim, value_dim),
            )  # fmt: skip

        compiled_with = dict(dtype=q.dtype, dims=(head_dim, value_dim), **ctx.poly.flags(), PREC=prec)
        launch_fitting("parallel dkdv", dkdv.step_downs(), launch_dkdv, **compiled_with)
        launch_fitting("parallel dq", dqc.step_downs(), launch_dq, **compiled_with)
        return dq, dk, dv, None, None, None, None, None


def row_terms_torch(do: Tensor, o: Tensor, den: Tensor, clamp: bool, normalize: bool, eps: float):
    """Per query row, fp32 [tokens, H]: r = 1 / (den + eps) and dd = -(do . o), with o the fp32 output (r = 1,
    dd = 0 without normalisation; dd = 0 where a clamped denominator had no gradient). row_terms_fused's twin."""
    if not normalize:
        ones = torch.ones_like(den)
        return ones, torch.zeros_like(ones)
    r = 1.0 / ((den.clamp_min(0.0) if clamp else den) + eps)
    dd = -(do.float() * o).sum(-1).reshape(den.shape)
    if clamp:
        dd = dd.masked_fill(den < 0, 0.0)
    return r.contiguous(), dd.contiguous()


def backward_row_terms(do: Tensor, o: Tensor, den: Tensor, clamp: bool, normalize: bool, eps: float):
    """r and dd for the backward kernels (this module's and chunk_states'): one kernel for a normalised
    output, constants otherwise."""
    if normalize:
        return row_terms_fused(do, o, den, clamp, eps)
    return row_terms_torch(do, o, den, clamp, normalize, eps)


def row_terms_fused(do: Tensor, o: Tensor, den: Tensor, clamp: bool, eps: float):
    """row_terms_torch of a normalised output, in one kernel."""
    rows, value_dim = den.numel(), o.shape[-1]
    r, dd = torch.empty_like(den), torch.empty_like(den)
    bv = max(16, triton.next_power_of_2(value_dim))
    br = max(1, 4096 // bv) if not interpreting() else 8
    parallel_row_terms_kernel[(triton.cdiv(rows, br),)](do, o, den, r, dd, rows, value_dim, eps, BR=br, BV=bv,
                                                        CLAMP=clamp)  # fmt: skip
    return r, dd


def _refuse(q: Tensor, k: Tensor, v: Tensor, initial_state) -> None:
    what = "(mode='parallel', backend='triton')"
    check_dtype_and_device(what, q, k, v)
    if initial_state is not None:
        raise NotImplementedError(f"{what} does not take an initial state: use mode='chunk'")
    check_head_dims(what, q, v)


def parallel_linear_attention(
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
    """The ("parallel", "triton") pair. The final state, when asked for, is summed in torch in feature space
    (one matmul); an initial state is not covered (the chunk kernel takes one)."""
    del chunk_size
    _refuse(q, k, v, initial_state)
    sequences = Sequences(batch=q.shape[0], length=q.shape[1])
    poly = PolynomialArgs.of(kernel)
    o = ParallelFunction.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), sequences, poly, normalize, eps, wants_gradients(q, k, v)
    )
    if not output_final_state:
        return o, None
    phi_k = features(k.float(), kernel)  # [B, T, H, F]
    return o, LinearAttentionState(torch.einsum("bthf,bthv->bhfv", phi_k, v.float()), phi_k.sum(1))


def packed_parallel_linear_attention(
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
    """Variable-length batches in one launch per kernel: the programs walk the sequences' offsets (the
    same kernels as the dense batch, which is B sequences of T). Final states, when asked for, per sequence
    in torch."""
    del chunk_size
    _refuse(q, k, v, initial_state)
    sequences = Sequences(cu_seqlens=cu_seqlens)
    poly = PolynomialArgs.of(kernel)
    o = ParallelFunction.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), sequences, poly, normalize, eps, wants_gradients(q, k, v)
    )
    if not output_final_state:
        return o, None
    bounds = cu_seqlens.tolist()
    phi_k = features(k[0].float(), kernel)  # [T_total, H, F]
    parts = [(phi_k[a:b], v[0, a:b].float()) for a, b in zip(bounds, bounds[1:])]
    kv = torch.stack([torch.einsum("thf,thv->hfv", f, x) for f, x in parts])
    return o, LinearAttentionState(kv, torch.stack([f.sum(0) for f, _ in parts]))
