"""The head and its cross-entropy in tiles: loss, dh and dW without the [M, V] logits ever in memory.

    z = h W^T,   lse_i = log sum_v exp(z_iv),   loss = sum_i (lse_i - z_i,t_i)
    dh_i = sum_v p_iv W_v - W_t_i,   dW_v = sum_i (p_iv - [v == t_i]) h_i,   p_iv = exp(z_iv - lse_i)
    (rows with t_i == ignore_index: loss 0, no gradient)

Where it pays: narrow heads (MQAR: D 64-128, V 8192, hundreds of thousands of labelled rows a step). There the
logits are the bulk of the work's bytes (4.3 GB in bf16 at L 2048), while recomputing a tile of them is a dot
with K = D, cheap next to reading it. So nothing [M, V]-sized is written: each tile of logits is made in
registers by the kernel that needs it, used, and dropped.

Two kernels:
- rows (one program per BM rows): walks the vocabulary tile by tile, keeping each row's running max m and sum
  of exponentials s, and for dh the running sum sum_v exp(z_iv - m) W_v, rescaled whenever m grows (the online
  softmax of flash attention). At the end lse = m + log s, loss_i = lse_i - z_i,t_i (z_i,t_i picked out of the
  tiles as they pass) and dh_i = acc_i / s_i - W_t_i: the onehot term subtracted exactly, in fp32.
- columns (one program per BN vocabulary rows and split of the rows): with lse known, walks its split's row
  tiles and adds (p - onehot)^T h into its fp32 [BN, D] accumulator. The row splits give enough programs to
  fill the GPU (V / BN alone is 64 at MQAR's 8192); their partial dW are summed afterwards in a fixed order,
  so dW is the same on every run (no atomics).

Four passes of dots with K = D over the [M, V] tile grid (z twice, p W, p^T h), and two of exponentials; the
unfused form has three matmuls but writes and reads the logits several times. For wide heads (a language
model's D 768, V 50k) the recomputation costs more than the bytes it saves: rebased.ops.cross_entropy takes
these kernels only up to TILED_MAX_DIM, and they take D up to MAX_DIM (one [BM, BD] tile of h and the [BM, BD]
accumulator in registers; past 128 they spill).

Precision: the dots' inputs are h and W in the matmul dtype (bf16 under autocast); z, p, the running sums and
the accumulators are fp32; p (and p - onehot) are rounded to the matmul dtype for the two gradient dots, as
the unfused form rounds dlogits. The logits themselves are not rounded to bf16 first, as a bf16 matmul's
output would be: a difference of that rounding (about 4e-3 relative on a logit).

A target outside [0, V) other than ignore_index: a NaN loss for its row (no device-side check without a sync).

Shape letters: M rows, V classes, D hidden; BM rows and BN classes per tile, BD = D padded to a power of two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from rebased.ops.triton.launch import dot_precision, interpreting, sm_count

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TILED_FP32_DOTS = "ieee"  # fp32 inputs: exact fp32 dots (the float64-checked tests run fp32)
MAX_DIM = 256
PROGRAMS_PER_SM = 4  # the columns kernel splits the rows until it has about this many programs per SM


@dataclass(frozen=True)
class TileLaunch:
    rows: int  # BM
    cols: int  # BN
    warps: int


# Per kernel on the GPU, for heads up to 64 wide and wider (bf16): the fastest launches of
# benchmarks/head_loss_bench.py on an H200 (benchmarks/results/h200_mqar/head_loss_4508870.md, 65,536 rows x
# 8,192 classes, ms per launch). D 64: rows 64 x 64 tiles with 4 warps 0.69 (the earlier 64 x 128, 8 warps:
# 1.23), columns 128 x 64, 4 warps 0.59 (0.68). D 128: rows 64 x 128, 4 warps 0.90 (64 x 64, 8 warps: 1.93),
# columns 64 x 64, 4 warps 0.62 (1.86). Four warps win everywhere, though compiled for sm_90a all but the D 64
# rows kernel spill at 255 registers (stack: columns D 64 136 B; D 128 rows 824 B, columns 400 B), where the
# 8-warp launches fit: fewer threads, each with more work in flight, beat the launches without spills.
GPU_LAUNCHES = {"rows": TileLaunch(64, 64, 4), "cols": TileLaunch(128, 64, 4)}
GPU_LAUNCHES_WIDE = {"rows": TileLaunch(64, 128, 4), "cols": TileLaunch(64, 64, 4)}
# Under the interpreter: 16 x 16, so small test shapes cross several tiles both ways.
INTERPRETER_LAUNCHES = {"rows": TileLaunch(16, 16, 1), "cols": TileLaunch(16, 16, 1)}


@triton.jit
def rows_kernel(h, w, targets, row_loss, lse_out, dh, M, V, D, ignore_index, stride_h, stride_w, stride_dh,
                BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, WRITE_DH: tl.constexpr,
                PREC: tl.constexpr):  # fmt: skip
    """Program i: rows [i BM, (i + 1) BM): their loss and lse, and dh when WRITE_DH."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    dims = tl.arange(0, BD)
    row_ok = rows < M
    h_tile = tl.load(h + rows[:, None].to(tl.int64) * stride_h + dims[None, :],
                     mask=row_ok[:, None] & (dims[None, :] < D), other=0.0)  # fmt: skip
    target = tl.load(targets + rows, mask=row_ok, other=ignore_index)
    m = tl.full([BM], float("-inf"), tl.float32)
    s = tl.zeros([BM], tl.float32)
    picked = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    for start in range(0, V, BN):
        classes = start + tl.arange(0, BN)
        w_tile = tl.load(w + classes[:, None].to(tl.int64) * stride_w + dims[None, :],
                         mask=(classes[:, None] < V) & (dims[None, :] < D), other=0.0)  # fmt: skip
        z = tl.dot(h_tile, tl.trans(w_tile), input_precision=PREC)
        z = tl.where(classes[None, :] < V, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every tile has a class < V
        rescale = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        s = s * rescale + tl.sum(p, axis=1)
        picked += tl.sum(tl.where(classes[None, :] == target[:, None], z, 0.0), axis=1)
        if WRITE_DH:
            acc = acc * rescale[:, None] + tl.dot(p.to(w_tile.dtype), w_tile, input_precision=PREC)
        m = m_new
    lse = m + tl.log(s)
    valid = row_ok & (target != ignore_index)
    in_range = (target >= 0) & (target < V)
    loss = tl.where(valid, tl.where(in_range, lse - picked, float("nan")), 0.0)
    tl.store(row_loss + rows, loss, mask=row_ok)
    tl.store(lse_out + rows, lse, mask=row_ok)
    if WRITE_DH:
        onehot_rows = valid & in_range
        w_target = tl.load(w + tl.where(onehot_rows, target, 0)[:, None].to(tl.int64) * stride_w + dims[None, :],
                           mask=onehot_rows[:, None] & (dims[None, :] < D), other=0.0)  # fmt: skip
        grad = tl.where(valid[:, None], acc / s[:, None] - w_target.to(tl.float32), 0.0)
        tl.store(dh + rows[:, None].to(tl.int64) * stride_dh + dims[None, :], grad.to(dh.dtype.element_ty),
                 mask=row_ok[:, None] & (dims[None, :] < D))  # fmt: skip


@triton.jit
def cols_kernel(h, w, targets, lse, dw_parts, M, V, D, ignore_index, split_rows, stride_h, stride_w,
                BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Program (j, k): classes [j BN, (j + 1) BN) over the k-th split of the rows: that split's share of dW."""
    classes = tl.program_id(0) * BN + tl.arange(0, BN)
    split = tl.program_id(1)
    dims = tl.arange(0, BD)
    class_ok = classes < V
    w_tile = tl.load(w + classes[:, None].to(tl.int64) * stride_w + dims[None, :],
                     mask=class_ok[:, None] & (dims[None, :] < D), other=0.0)  # fmt: skip
    acc = tl.zeros([BN, BD], tl.float32)
    first = split * split_rows
    last = tl.minimum(first + split_rows, M)
    for start in range(first, last, BM):
        rows = start + tl.arange(0, BM)
        row_ok = rows < last
        h_tile = tl.load(h + rows[:, None].to(tl.int64) * stride_h + dims[None, :],
                         mask=row_ok[:, None] & (dims[None, :] < D), other=0.0)  # fmt: skip
        target = tl.load(targets + rows, mask=row_ok, other=ignore_index)
        row_lse = tl.load(lse + rows, mask=row_ok, other=0.0)
        z = tl.dot(h_tile, tl.trans(w_tile), input_precision=PREC)
        p = tl.exp(z - row_lse[:, None])
        p = tl.where(classes[None, :] == target[:, None], p - 1.0, p)
        p = tl.where((row_ok & (target != ignore_index))[:, None] & class_ok[None, :], p, 0.0)
        acc += tl.dot(tl.trans(p.to(h_tile.dtype)), h_tile, input_precision=PREC)
    out = dw_parts + split.to(tl.int64) * V * D + classes[:, None].to(tl.int64) * D + dims[None, :]
    tl.store(out, acc, mask=class_ok[:, None] & (dims[None, :] < D))


def launches(dim: int) -> dict[str, TileLaunch]:
    if interpreting():
        return INTERPRETER_LAUNCHES
    return GPU_LAUNCHES if dim <= 64 else GPU_LAUNCHES_WIDE


def row_splits(rows: int, vocab: int, launch: TileLaunch, device: torch.device) -> tuple[int, int]:
    """(splits, rows per split) for the columns kernel: enough programs for PROGRAMS_PER_SM on each SM, each
    split a whole number of BM-row tiles, no split empty."""
    tiles = triton.cdiv(rows, launch.rows)
    wanted = triton.cdiv(PROGRAMS_PER_SM * sm_count(device), triton.cdiv(vocab, launch.cols))
    per_split = triton.cdiv(tiles, max(1, min(tiles, wanted)))
    return triton.cdiv(tiles, per_split), per_split * launch.rows


def head_loss_tiles(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, *, need_dh: bool, need_dw: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(loss, dh, dW): loss a 0-dim fp32 tensor, the sum over rows with targets != ignore_index of
    logsumexp(z_i) - z_i,t_i for z = hidden @ weight.T; dh [M, D] in hidden's dtype (when need_dh); dW [V, D]
    fp32 (when need_dw). hidden [M, D] and weight [V, D] in one dtype of SUPPORTED_DTYPES, D <= MAX_DIM,
    targets [M] int64, all on one CUDA device (or the CPU under TRITON_INTERPRET=1)."""
    _check(hidden, weight, targets)
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    (rows, dim), device = hidden.shape, hidden.device
    if rows == 0:
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=device) if need_dw else None
        return torch.zeros((), device=device), torch.empty_like(hidden) if need_dh else None, dw
    launch = launches(dim)
    row_loss, lse, dh = launch_rows(hidden, weight, targets, ignore_index, need_dh, launch["rows"])
    dw = launch_cols(hidden, weight, targets, ignore_index, lse, launch["cols"]) if need_dw else None
    return row_loss.sum(), dh, dw


def launch_rows(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, need_dh: bool, launch: TileLaunch
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The rows kernel at `launch` on checked, contiguous, non-empty inputs: (row losses, lse, dh or None)."""
    (rows, dim), vocab = hidden.shape, weight.shape[0]
    row_loss = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(row_loss)
    dh = torch.empty_like(hidden) if need_dh else None
    rows_kernel[(triton.cdiv(rows, launch.rows),)](
        hidden, weight, targets, row_loss, lse, hidden if dh is None else dh, rows, vocab, dim, ignore_index,
        hidden.stride(0), weight.stride(0), dim, BM=launch.rows, BN=launch.cols, BD=_padded(dim), WRITE_DH=need_dh,
        PREC=dot_precision(hidden.dtype, TILED_FP32_DOTS), num_warps=launch.warps,
    )  # fmt: skip
    return row_loss, lse, dh


def launch_cols(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, lse: Tensor, launch: TileLaunch
) -> Tensor:
    """The columns kernel at `launch` (the rows' lse from launch_rows), its row splits summed: dW in fp32."""
    (rows, dim), vocab = hidden.shape, weight.shape[0]
    splits, split_rows = row_splits(rows, vocab, launch, hidden.device)
    parts = torch.empty(splits, vocab, dim, dtype=torch.float32, device=hidden.device)
    cols_kernel[(triton.cdiv(vocab, launch.cols), splits)](
        hidden, weight, targets, lse, parts, rows, vocab, dim, ignore_index, split_rows, hidden.stride(0),
        weight.stride(0), BM=launch.rows, BN=launch.cols, BD=_padded(dim),
        PREC=dot_precision(hidden.dtype, TILED_FP32_DOTS), num_warps=launch.warps,
    )  # fmt: skip
    return parts.sum(0)


def _padded(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _check(hidden: object, weight: object, targets: object) -> None:
    for name, x in (("hidden", hidden), ("weight", weight)):
        if not isinstance(x, Tensor) or x.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor, got {x if not isinstance(x, Tensor) else x.shape}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight [V, D] must have hidden's D = {hidden.shape[1]}, got shape {tuple(weight.shape)}")
    if hidden.shape[1] > MAX_DIM:
        raise NotImplementedError(f"head_loss_tiles takes D up to {MAX_DIM}, got {hidden.shape[1]}")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one class")
    if not isinstance(targets, Tensor) or targets.dtype != torch.int64 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be int64 of shape [{hidden.shape[0]}], got {targets!r:.80}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"hidden, weight, targets on different devices: {hidden.device}, {weight.device}, "
                         f"{targets.device}")  # fmt: skip
    if hidden.device.type != "cuda" and not interpreting():
        raise NotImplementedError(f"head_loss_tiles needs CUDA tensors (or TRITON_INTERPRET=1), got {hidden.device}")
