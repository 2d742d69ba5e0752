"""Fused linear + cross-entropy over row chunks: the summed loss of a linear head without its [M, V] logits.

    loss = sum over rows i with targets[i] != ignore_index of  logsumexp_v(z_iv) - z_i,targets[i],  z = h @ W.T

This is what `F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")` gives, under autocast
or not. Written that way, autograd keeps the full [M, V] logits (in the matmul dtype, again in fp32, and the
log-softmax) until the backward: at MQAR's M = 262,144 labelled rows and V = 8,192 that is gigabytes, and moving
them costs a large share of a training step. Here the forward walks `chunk_rows` rows at a time and computes each
chunk's gradient at once (the loss is a scalar, so dlogits = softmax - onehot(target) needs nothing from later
chunks): dh for the chunk's rows, and its share of dW. Only dh [M, D] and dW [V, D] are saved; the backward
multiplies them by the incoming scalar gradient.

Memory: dh (M x D, matmul dtype) + dW (V x D, fp32 or fp64) + one chunk of logits (chunk_rows x V, in fp32 and
twice in the matmul dtype), instead of several M x V tensors.

Dtypes: under autocast for the inputs' device, the matmuls run in autocast's dtype and the softmax in fp32, as
autocast runs the unfused form; without autocast, in the inputs' common dtype, with the softmax in fp32 (fp64
for fp64). This is plain torch for any device, checked against F.cross_entropy in tests/test_cross_entropy.py.

Backends (the `backend` keyword): "torch" is the per-chunk softmax above, in torch ops; "triton" computes each
chunk's loss and dlogits in one kernel from the matmul's logits (rebased/ops/triton/cross_entropy.py: same
math in fp32, dlogits written over the logits, in the matmul dtype, without the chunk's fp32 copies); "auto"
takes triton for CUDA tensors when AUTO_TRITON_ON_GPU is set, triton is installed at a version the GPU tests
passed on and the matmul dtype is not fp64, else torch. The matmuls and the dW sum are the same for both.
Where Triton computes the loss and the head is at most TILED_MAX_DIM wide, the tile kernels
(rebased/ops/triton/head_loss.py) take the whole head instead: each tile of logits made in registers and
dropped, nothing [M, V] in memory, no chunks. Explicit backends never fall back: "triton" refuses fp64 and,
outside TRITON_INTERPRET=1, CPU tensors (NotImplementedError).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rebased.ops.common import check_choice, check_tensor, compute_dtype

# One chunk's fp32 logits: 2^25 elements = 128 MB (plus two matmul-dtype copies). Big enough that each chunk's
# matmuls are large ([4096, D] x [D, 8192] at MQAR's vocabulary, ~670 rows at 50k) and the Python loop is a few
# dozen iterations; small next to the gigabytes the unfused form holds.
CHUNK_LOGITS_ELEMENTS = 2**25
CROSS_ENTROPY_BACKENDS = ("torch", "triton", "auto")
# Whether "auto" may take the Triton kernel at all. Its compiled form passed the GPU tests on an H200
# (tests/test_triton_cross_entropy.py -m gpu, run by benchmarks/step_gpu.sh) and ran the fused loss 2-4x faster
# than the torch chunks there (benchmarks/results/h200_mqar/loss.md), and faster than the unfused logits too.
AUTO_TRITON_ON_GPU = True
# Heads up to this wide take the Triton tile kernels (rebased/ops/triton/head_loss.py: no logits in memory) where
# Triton computes the loss; wider ones the row kernel over chunks of logits. The MQAR step at L 2048 on an H200
# (benchmarks/results/h200_mqar/mqar_step_726ab68.log, the median of 3 trainings a cell, in one process): 46.6
# against 49.5 ms at d_model 128 for ReBased, 49.0 against 52.0 for Based; at d_model 64 the tiles' lead is larger
# (loss_0076ef9.md: 8 against 20 ms for the loss alone).
TILED_MAX_DIM = 128


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk so that one chunk's logits are about CHUNK_LOGITS_ELEMENTS elements; at least 1."""
    return max(1, CHUNK_LOGITS_ELEMENTS // max(1, vocab))


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """sum over rows with targets != ignore_index of  logsumexp(hidden @ weight.T) - (hidden @ weight.T)[target]

    hidden [M, D], weight [V, D] (an nn.Linear's weight, no bias), targets [M] int64 -> a 0-dim tensor, float32
    (float64 when the matmul runs in float64). chunk_rows: rows per chunk (default default_chunk_rows(V)).
    Gradients flow to hidden and weight (once: no double backward); a weight tied to an embedding works.
    backend: "torch", "triton" or "auto", for the per-chunk softmax (the module docstring says which runs where).
    """
    check_choice("backend", backend, CROSS_ENTROPY_BACKENDS)
    _validate(hidden, weight, targets, ignore_index, chunk_rows)
    chunk_rows = default_chunk_rows(weight.shape[0]) if chunk_rows is None else chunk_rows
    matmul_dtype = _matmul_dtype(hidden, weight)
    kernel = _kernel(backend, hidden, matmul_dtype)
    grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if grads:
        return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk_rows, matmul_dtype, kernel)
    with torch.autocast(hidden.device.type, enabled=False):
        loss, _, _ = _head_loss(hidden, weight, targets, ignore_index, chunk_rows, matmul_dtype, False, False, kernel)
    return loss


def _kernel(backend: str, hidden: Tensor, matmul_dtype: torch.dtype) -> str:
    """What computes the loss (backend resolved; see the module docstring): "torch" (chunks of logits, softmax in
    torch ops), "rows" (chunks of logits, softmax in the Triton row kernel) or "tiles" (the Triton tile kernels,
    no logits: heads up to TILED_MAX_DIM wide)."""
    if not _takes_triton(backend, hidden, matmul_dtype):
        return "torch"
    return "tiles" if hidden.shape[1] <= TILED_MAX_DIM else "rows"


def _takes_triton(backend: str, hidden: Tensor, matmul_dtype: torch.dtype) -> bool:
    if backend == "torch":
        return False
    from rebased.ops import auto_picks_triton, require_triton  # (imports triton only when asked for)

    if backend == "auto":
        return AUTO_TRITON_ON_GPU and matmul_dtype != torch.float64 and auto_picks_triton(hidden)
    require_triton("linear_cross_entropy(backend='triton')", hidden)
    if matmul_dtype == torch.float64:
        raise NotImplementedError("linear_cross_entropy(backend='triton') computes in fp32: float64 needs 'torch'")
    return True


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_rows, matmul_dtype, kernel):
        need_dh, need_dw = ctx.needs_input_grad[:2]
        # _chunked casts to matmul_dtype (autocast's choice, made by the caller) itself: autocast left on would
        # only cast operands a second time, and each cast is a copy
        with torch.autocast(hidden.device.type, enabled=False):
            loss, dh, dw = _head_loss(
                hidden, weight, targets, ignore_index, chunk_rows, matmul_dtype, need_dh, need_dw, kernel
            )
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        # The gradients were computed in forward, outside any graph: with create_graph they would enter the new
        # graph as constants, and a second derivative through them would be silently wrong. Refuse instead
        # (once_differentiable would raise only when grad_output itself requires grad).
        if torch.is_grad_enabled():
            raise RuntimeError("linear_cross_entropy does not support double backward (backward with create_graph)")
        dh, dw = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        # not in place: a retained graph may run this backward again with the same saved tensors
        grad_hidden = None if dh is None else (dh.to(hidden_dtype) * grad_output).to(hidden_dtype)
        grad_weight = None if dw is None else (dw * grad_output).to(weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def _head_loss(hidden, weight, targets, ignore_index, chunk_rows, matmul_dtype, need_dh, need_dw, kernel):
    """(loss, dh or None, dW or None): dh in the matmul dtype, loss and dW in its softmax dtype."""
    h, w = hidden.to(matmul_dtype), weight.to(matmul_dtype)  # once, as autocast casts the whole operands
    if kernel == "tiles":
        from rebased.ops.triton.head_loss import head_loss_tiles

        return head_loss_tiles(h, w, targets, ignore_index, need_dh=need_dh, need_dw=need_dw)
    return _chunked(h, w, targets, ignore_index, chunk_rows, need_dh, need_dw, fused=kernel == "rows")


def _chunked(h, w, targets, ignore_index, chunk_rows, need_dh, need_dw, fused):
    """The loss summed over chunks of rows, and each chunk's gradients (h and w in the matmul dtype).
    fused: each chunk's loss and dlogits from the Triton kernel (written over the chunk's logits), else torch."""
    rows, matmul_dtype = h.shape[0], h.dtype
    softmax_dtype = compute_dtype(matmul_dtype)
    loss = torch.zeros((), dtype=softmax_dtype, device=h.device)
    dh = torch.empty_like(h) if need_dh else None
    dw = torch.zeros(w.shape, dtype=softmax_dtype, device=w.device) if need_dw else None
    if fused:
        from rebased.ops.triton.cross_entropy import softmax_grad_rows
    for start in range(0, rows, chunk_rows):
        part = slice(start, min(start + chunk_rows, rows))
        if fused:  # logits in the matmul dtype, read by the kernel in fp32; dlogits in their place
            chunk_loss, dlogits = softmax_grad_rows(h[part] @ w.T, targets[part], ignore_index, grad=need_dh or need_dw)
            loss += chunk_loss
        else:
            logits = (h[part] @ w.T).to(softmax_dtype)  # rounded in the matmul dtype first, as the unfused form is
            valid = targets[part] != ignore_index
            target = targets[part].masked_fill(~valid, 0)  # any in-range index; these rows are masked out below
            lse = torch.logsumexp(logits, dim=1)
            loss += _chunk_loss(logits, lse, target, valid)
            if need_dh or need_dw:
                dlogits = _softmax_minus_onehot(logits, lse, target, valid).to(matmul_dtype)
        if need_dh:
            torch.mm(dlogits, w, out=dh[part])
        if need_dw:
            dw += (dlogits.T @ h[part]).to(softmax_dtype)
    return loss, dh, dw


def _chunk_loss(logits: Tensor, lse: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Summed loss of the valid rows; torch.where, not a product, so an ignored row's inf/NaN cannot leak in."""
    per_row = lse - logits.gather(1, target[:, None]).squeeze(1)
    return torch.where(valid, per_row, 0).sum()


def _softmax_minus_onehot(logits: Tensor, lse: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """d loss / d logits = softmax - onehot(target), zero on ignored rows; in place of logits (no second copy)."""
    probs = logits.sub_(lse[:, None]).exp_()
    probs.scatter_add_(1, target[:, None], probs.new_full((len(target), 1), -1))
    return probs.masked_fill_(~valid[:, None], 0)


def _matmul_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """Autocast's dtype when it is on for the inputs' device (it leaves fp64 alone, so fp64 stays fp64), else
    the inputs' common dtype."""
    device = hidden.device.type
    common = torch.promote_types(hidden.dtype, weight.dtype)
    if torch.is_autocast_enabled(device) and common != torch.float64:
        return torch.get_autocast_dtype(device)
    return common


def _validate(hidden, weight, targets, ignore_index, chunk_rows) -> None:
    check_tensor("hidden", hidden, 2)
    check_tensor("weight", weight, 2)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight [V, D] must have hidden's D = {hidden.shape[1]}, got shape {tuple(weight.shape)}")
    if not isinstance(targets, Tensor) or targets.dtype != torch.int64 or targets.dim() != 1:
        what = f"{targets.dtype} of shape {tuple(targets.shape)}" if isinstance(targets, Tensor) else type(targets)
        raise ValueError(f"targets must be a 1-D int64 tensor, got {what}")
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets has {targets.shape[0]} entries, hidden has {hidden.shape[0]} rows")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(
            f"hidden, weight, targets on different devices: {hidden.device}, {weight.device}, {targets.device}"
        )
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be an int >= 1 or None, got {chunk_rows!r}")
    # Range check on the host only: on a GPU it would make the host wait for the device every step (the training
    # loop avoids exactly that sync); there an out-of-range target still fails, as a device-side assert in gather.
    if targets.device.type == "cpu":
        vocab = weight.shape[0]
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
        if bad.any():
            raise ValueError(
                f"targets must be in [0, {vocab}) or ignore_index={ignore_index}, got {targets[bad][0].item()}"
            )
