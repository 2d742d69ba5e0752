"""Cross-entropy rows in one kernel: each row's loss and its gradient softmax - onehot, from the matmul's logits.

    lse_i = log sum_v exp(z_iv),   loss_i = lse_i - z_i,t_i,   dz_iv = exp(z_iv - lse_i) - [v == t_i]
    (rows with t_i == ignore_index: loss 0, dz 0)

What it replaces: the per-chunk softmax of rebased.ops.cross_entropy._chunked, a chain of eager torch ops over
the chunk's [C, V] logits, each of which reads its input from memory and writes its result back. Per logit, with
bf16 matmuls: the cast to fp32 (2 bytes read, 4 written); logsumexp, itself four passes in eager torch (amax,
the subtraction, exp_, sum: 24 bytes); subtracting lse, exp, the masked fill (8 bytes each); the cast of dlogits
back to bf16 (4 read, 2 written). About 60 bytes of traffic per logit, ten times what the two matmuls around
it need (about 6: the logits written once, dlogits read by each). Here one program owns a row: it reads the
bf16 logits once for the row's max and sum of exponentials (fp32, updated online block by block), and a second
time to write dlogits in bf16: 6 bytes per logit (the second read, of a row just read, may come from L2). When
the row fits one register block (V <= MAX_BLOCK; MQAR's V = 8192 does) the exponentials stay in registers and
the row is read once: 4 bytes. Nothing fp32 is [C, V]-sized, so the chunk's fp32 copy of its logits (128 MB at
the default chunk) is never allocated; and dlogits goes over the logits by default (each is computed from the
logit it replaces), so the kernel allocates only a [C] fp32 buffer of row losses. torch sums those afterwards:
a fixed order, no atomics, the same sum on every run.

A row with an ignored target is not read at all (its dlogits are zeros, still written: the matmuls read them).
A target outside [0, V) (not ignore_index) cannot be caught on the device without a host sync; its row gets a
NaN loss, and no onehot subtracted, so the training loss shows it.

Alignment: the compiled kernel loads and stores 16 bytes at a time only where it can prove a row starts on a
16-byte boundary, i.e. when the row stride is a multiple of 16 (Triton specialises integer arguments on that).
V = 8192 is; the GPT-NeoX V = 50277 is not, and compiles to 2-byte accesses (sm_90 PTX, read offline). So the
logits may also be the first V columns of a wider buffer (strides (S, 1), S >= V): a caller that pads S to a
multiple of 16 (50304) gets the 16-byte accesses. rebased.ops.cross_entropy does not pad yet.

Shape letters: C rows (a chunk), V classes; BLOCK columns per step of a program's walk over its row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from rebased.ops.triton.launch import interpreting

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Columns per block. A compiled program holds one block of fp32 values (and their exponentials) in registers;
# 8192 with 16 warps is 16 values a thread (two 16-byte loads of bf16), and covers MQAR's V = 8192 in one
# block, so those rows are read once. Under the interpreter, 16, so that tiny tests walk several blocks.
MAX_BLOCK = 8192
INTERPRETED_MAX_BLOCK = 16
ELEMENTS_PER_THREAD = 16


@triton.jit
def softmax_grad_rows_kernel(logits, dlogits, targets, row_loss, V, stride, grad_stride, ignore_index,
                             BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr):  # fmt: skip
    """Program i: row i. In place (dlogits == logits) is safe without barriers: each dlogit is computed from
    the logit it overwrites and from lse, which depends on every read of pass 1; and the target's logit is
    picked out of pass 1's blocks rather than loaded on its own, so no read can come after a write."""
    row = tl.program_id(0)
    base = row.to(tl.int64) * stride
    grad_base = row.to(tl.int64) * grad_stride
    target = tl.load(targets + row)
    cols = tl.arange(0, BLOCK)
    loss = 0.0
    if target != ignore_index:
        if ONE_BLOCK:  # the whole row in registers: one read, one write
            x = tl.load(logits + base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m = tl.max(x, axis=0)
            e = tl.exp(x - m)
            s = tl.sum(e, axis=0)
            picked = tl.sum(tl.where(cols == target, x, 0.0), axis=0)
            if WRITE_GRAD:
                p = e * (1.0 / s)
                p = tl.where(cols == target, p - 1.0, p)
                tl.store(dlogits + grad_base + cols, p.to(dlogits.dtype.element_ty), mask=cols < V)
            lse = m + tl.log(s)
        else:  # pass 1: max and sum of exponentials, online over the blocks (one exp per logit)
            m = float("-inf")
            s = 0.0
            picked = 0.0
            for start in range(0, V, BLOCK):
                c = start + cols
                x = tl.load(logits + base + c, mask=c < V, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, axis=0))  # finite: every block has a column < V
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
                picked += tl.sum(tl.where(c == target, x, 0.0), axis=0)
                m = m_new
            lse = m + tl.log(s)
            if WRITE_GRAD:  # pass 2: read again, write softmax - onehot
                for start in range(0, V, BLOCK):
                    c = start + cols
                    x = tl.load(logits + base + c, mask=c < V, other=float("-inf")).to(tl.float32)
                    p = tl.exp(x - lse)
                    p = tl.where(c == target, p - 1.0, p)
                    tl.store(dlogits + grad_base + c, p.to(dlogits.dtype.element_ty), mask=c < V)
        loss = tl.where((target >= 0) & (target < V), lse - picked, float("nan"))
    else:
        if WRITE_GRAD:  # zeros, without reading the row
            zeros = tl.zeros([BLOCK], dlogits.dtype.element_ty)
            for start in range(0, V, BLOCK):
                tl.store(dlogits + grad_base + start + cols, zeros, mask=start + cols < V)
    tl.store(row_loss + row, loss)


def launch_config(vocab: int) -> tuple[int, bool, int]:
    """(BLOCK, ONE_BLOCK, num_warps) for rows of `vocab` classes: the smallest power of two >= vocab (at least
    16) up to the block cap; num_warps so that each thread holds ELEMENTS_PER_THREAD of a block (1 to 16)."""
    cap = INTERPRETED_MAX_BLOCK if interpreting() else MAX_BLOCK
    block = min(max(16, triton.next_power_of_2(vocab)), cap)
    warps = min(16, max(1, block // (32 * ELEMENTS_PER_THREAD)))
    return block, vocab <= block, warps


def softmax_grad_rows(
    logits: Tensor, targets: Tensor, ignore_index: int, *, grad: bool = True, in_place: bool = True
) -> tuple[Tensor, Tensor | None]:
    """(loss_sum, dlogits) of cross-entropy rows: loss_sum a 0-dim fp32 tensor, the sum over rows with
    targets != ignore_index of logsumexp(row) - row[target]; dlogits [C, V] in logits' dtype, softmax(row) -
    onehot(target), zero rows where targets == ignore_index.

    logits [C, V], bf16, fp16 or fp32 (math in fp32 whatever the dtype), contiguous or the first V columns of
    a wider buffer (strides (S, 1), S >= V); targets [C] int64 on the same device (CUDA, or any under
    TRITON_INTERPRET=1). in_place (the default): dlogits is written over `logits` and is the same tensor, so
    the caller must not need the logits afterwards; in_place=False: a new contiguous tensor. grad=False: the
    loss only, nothing written, dlogits None. A target outside [0, V) other than ignore_index gives a NaN loss.
    """
    _check(logits, targets, ignore_index)
    rows, vocab = logits.shape
    targets = targets.contiguous()
    row_loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    dlogits = (logits if in_place else logits.new_empty(logits.shape)) if grad else None
    if rows:
        block, one_block, warps = launch_config(vocab)
        softmax_grad_rows_kernel[(rows,)](
            logits, logits if dlogits is None else dlogits, targets, row_loss, vocab, logits.stride(0),
            vocab if dlogits is None else dlogits.stride(0), ignore_index,
            BLOCK=block, ONE_BLOCK=one_block, WRITE_GRAD=grad, num_warps=warps,
        )  # fmt: skip
    return row_loss.sum(), dlogits


def _check(logits: object, targets: object, ignore_index: object) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        what = f"shape {tuple(logits.shape)}" if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a 2-D tensor [C, V], got {what}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    rows, vocab = logits.shape
    if (vocab > 1 and logits.stride(1) != 1) or (rows > 1 and logits.stride(0) < vocab):
        raise ValueError(
            f"logits must be contiguous (or rows of a wider buffer: strides (S >= V, 1)), got strides "
            f"{logits.stride()} for shape {tuple(logits.shape)}"
        )
    if vocab < 1:
        raise ValueError(f"logits must have at least one class, got shape {tuple(logits.shape)}")
    if not isinstance(targets, Tensor) or targets.dtype != torch.int64 or targets.dim() != 1:
        what = f"{targets.dtype} of shape {tuple(targets.shape)}" if isinstance(targets, Tensor) else type(targets)
        raise ValueError(f"targets must be a 1-D int64 tensor, got {what}")
    if targets.shape[0] != rows:
        raise ValueError(f"targets has {targets.shape[0]} entries, logits has {rows} rows")
    if targets.device != logits.device:
        raise ValueError(f"logits and targets on different devices: {logits.device}, {targets.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if logits.device.type != "cuda" and not interpreting():
        raise NotImplementedError(f"softmax_grad_rows needs CUDA tensors (or TRITON_INTERPRET=1), got {logits.device}")
