"""The gradient of an embedding lookup, dW[v] = sum of dy[t] over the positions t with ids[t] == v, in a fixed
order (deterministic, no atomics) and without one long serial sum per frequent id.

Why: PyTorch's CUDA backward sorts the ids and sums each id's rows. An id that fills a quarter of the
positions becomes one segment of 65,536 rows: MQAR's filler token 0 does that in every micro-batch of the
paper's batch. That sum then runs long after the rest of the GPU is idle (0.66 ms of the micro-batch's
9.5 ms step on an H200, benchmarks/results/h200_mqar). Here the sorted positions of each block of BV ids are
cut into SPLITS equal parts, one program each. A program sums its rows into a [BV, D] tile as
onehot^T @ dy tiles (exact fp32 dots: the onehot is 0/1). The SPLITS partial tiles are then added in a fixed
order. A frequent id is spread over SPLITS programs, and every id's rows are read once.

    order = argsort(ids, stable)     starts[b] = first sorted position of an id >= b BV     (no host sync)
    program (b, s): rows order[starts[b] + s n_b / SPLITS ...]  ->  parts[s, b BV : (b + 1) BV, :]
    dW = parts.sum(0)

Scope: D up to MAX_DIM (one [BV, BD] fp32 accumulator in registers); the parts take SPLITS x V x D fp32, so
SPLITS shrinks for large V x D (an LM's 50k x 768 gets one split and takes torch instead: rebased.ops.embedding).
Shape letters: T positions, V ids, D features; BT positions and BV ids per tile, BD = D padded to a power of 2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from rebased.ops.triton.launch import interpreting

MAX_DIM = 256
MAX_SPLITS = 16  # a frequent id's rows over this many programs
PARTS_ELEMENTS = 2**25  # the parts' fp32 elements at most (128 MB)
# (BV ids, BT positions, warps) by the largest D they take. Not yet timed: compiled for sm_90a (fp32 dy), these
# hold the [BV, BD] accumulator without spilling (128, 128 and 160 registers); 4 warps at D 128 or 256 spill.
GPU_TILES = ((64, (64, 64, 8)), (128, (64, 32, 8)), (256, (32, 32, 8)))
INTERPRETER_TILE = (16, 16, 1)  # small tests cross several id blocks and position tiles


@triton.jit
def embedding_grad_kernel(order, sorted_ids, starts, dy, parts, V, D, stride_dy, SPLITS,
                          BV: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    """Program (b, s): split s of the positions whose ids are in block b, summed into parts[s, block b]."""
    block, split = tl.program_id(0), tl.program_id(1)
    lo, hi = tl.load(starts + block), tl.load(starts + block + 1)
    count = hi - lo
    first = lo + (count * split) // SPLITS
    last = lo + (count * (split + 1)) // SPLITS
    ids_here = block * BV + tl.arange(0, BV)
    dims = tl.arange(0, BD)
    acc = tl.zeros([BV, BD], dtype=tl.float32)
    for start in range(first, last, BT):
        positions = start + tl.arange(0, BT)
        inside = positions < last
        ids = tl.load(sorted_ids + positions, mask=inside, other=-1)
        rows = tl.load(order + positions, mask=inside, other=0)
        grad = tl.load(dy + rows[:, None] * stride_dy + dims[None, :], mask=inside[:, None] & (dims[None, :] < D),
                       other=0.0).to(tl.float32)  # fmt: skip
        onehot = (ids_here[:, None] == ids[None, :]).to(tl.float32)
        acc += tl.dot(onehot, grad, input_precision="ieee")
    out = parts + (split * V + ids_here[:, None]).to(tl.int64) * D + dims[None, :]
    tl.store(out, acc, mask=(ids_here[:, None] < V) & (dims[None, :] < D))


def splits_for(vocab: int, dim: int) -> int:
    """How many programs share one id block's positions: MAX_SPLITS, fewer where the parts would pass
    PARTS_ELEMENTS."""
    return max(1, min(MAX_SPLITS, PARTS_ELEMENTS // max(1, vocab * dim)))


def embedding_grad(ids: Tensor, dy: Tensor, vocab: int) -> Tensor:
    """dW [vocab, D] in fp32: the sum of dy's rows [T, D] by their ids [T] (int64, each in [0, vocab)), in a fixed
    order. On a CUDA device (or the CPU under TRITON_INTERPRET=1); D <= MAX_DIM."""
    _check(ids, dy, vocab)
    ids, dy = ids.reshape(-1), dy.reshape(-1, dy.shape[-1])
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    dim = dy.shape[1]
    bv, bt, warps = INTERPRETER_TILE if interpreting() else next(t for d, t in GPU_TILES if dim <= d)
    splits = splits_for(vocab, dim)
    blocks = triton.cdiv(vocab, bv)
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    bounds = torch.arange(0, (blocks + 1) * bv, bv, device=ids.device, dtype=ids.dtype)
    starts = torch.searchsorted(sorted_ids, bounds)
    parts = torch.empty(splits, vocab, dim, dtype=torch.float32, device=dy.device)
    embedding_grad_kernel[(blocks, splits)](
        order, sorted_ids, starts, dy, parts, vocab, dim, dy.stride(0), splits,
        BV=bv, BT=bt, BD=max(16, triton.next_power_of_2(dim)), num_warps=warps,
    )  # fmt: skip
    return parts.sum(0)


def _check(ids: object, dy: object, vocab: int) -> None:
    if not isinstance(ids, Tensor) or ids.dtype != torch.int64:
        raise ValueError(f"ids must be an int64 tensor, got {ids!r:.80}")
    if not isinstance(dy, Tensor) or dy.dim() < 1 or dy.shape[:-1] != ids.shape:
        raise ValueError(f"dy must have shape ids.shape + (D,) = {tuple(ids.shape)} + (D,), got "
                         f"{None if not isinstance(dy, Tensor) else tuple(dy.shape)}")  # fmt: skip
    if not dy.is_floating_point():
        raise ValueError(f"dy must be a float tensor, got {dy.dtype}")
    if dy.shape[-1] > MAX_DIM:
        raise NotImplementedError(f"embedding_grad takes D up to {MAX_DIM}, got {dy.shape[-1]}")
    if vocab < 1:
        raise ValueError(f"vocab must be >= 1, got {vocab}")
    if ids.device != dy.device:
        raise ValueError(f"ids and dy on different devices: {ids.device}, {dy.device}")
    if ids.device.type != "cuda" and not interpreting():
        raise NotImplementedError(f"embedding_grad needs CUDA tensors (or TRITON_INTERPRET=1), got {ids.device}")
