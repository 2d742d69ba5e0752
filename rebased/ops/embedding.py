"""An embedding lookup whose weight gradient can come from a Triton kernel: rebased.ops.triton.embedding says
why (a frequent id, like MQAR's filler token, makes torch's CUDA backward one long serial sum).

    y = weight[ids]        dweight[v] = sum over t with ids[t] == v of dy[t]

backend "torch" is F.embedding and its own backward (the reference); "triton" sums the gradient in the kernel,
in a fixed order; "auto" takes triton for CUDA tensors when EMBEDDING_TRITON_ON_GPU is set, triton is
installed at a version the GPU tests passed on, and D is at most the kernel's MAX_DIM with a split of the
parts (not an LM's 50k x 768), else torch. The forward is F.embedding for every backend.
Explicit backends never fall back.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rebased.ops.common import check_choice

EMBEDDING_BACKENDS = ("torch", "triton", "auto")
_KERNEL_MODULE = "rebased.ops.triton.embedding"
# Whether "auto" may take the kernel on a GPU. Timed in the graphed MQAR step on an H200 (benchmarks/step_gpu.sh,
# benchmarks/results/h200_mqar/mqar_step_4508870.log, ms per step at batch 512, torch's backward -> the kernel):
# ReBased L 2048 d_model 64 41.5 -> 36.3, d_model 128 59.1 -> 54.5, Based d 64 L 2048 39.7 -> 38.6; at L 512
# 8.3 -> 8.7, inside the +-0.5 ms between calls. Its GPU tests, CUDA-graph capture included, pass.
EMBEDDING_TRITON_ON_GPU = True


def embedding(ids: Tensor, weight: Tensor, *, backend: str = "auto") -> Tensor:
    """weight[ids], with the weight's gradient from `backend`; ids int64 of any shape, weight [V, D]."""
    from rebased.ops import pick_backend  # (rebased.ops imports this module)

    # an explicit "triton" refuses CPU tensors here, not in the backward; _kernel_takes imports triton
    fits = lambda: _kernel_takes(weight)  # noqa: E731
    backend = pick_backend(backend, weight, "embedding", enabled=EMBEDDING_TRITON_ON_GPU, fits=fits)
    if backend == "torch" or not weight.requires_grad:
        return F.embedding(ids, weight)
    return _TritonGradEmbedding.apply(ids, weight)


def _kernel_takes(weight: Tensor) -> bool:
    kernel = importlib.import_module(_KERNEL_MODULE)
    vocab, dim = weight.shape
    return dim <= kernel.MAX_DIM and kernel.splits_for(vocab, dim) > 1


class _TritonGradEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.vocab, ctx.weight_dtype = weight.shape[0], weight.dtype
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, dy: Tensor):
        (ids,) = ctx.saved_tensors
        grad = importlib.import_module(_KERNEL_MODULE).embedding_grad(ids.long(), dy, ctx.vocab)
        return None, grad.to(ctx.weight_dtype)


class Embedding(nn.Embedding):
    """nn.Embedding (same parameters and state dict; no padding_idx, max_norm or sparse gradients) whose weight
    gradient comes from `embedding`'s backends."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, backend: str = "auto", **kwargs):
        for option in ("padding_idx", "max_norm", "scale_grad_by_freq", "sparse"):
            if kwargs.get(option) is not None and kwargs.get(option) is not False:  # padding_idx=0 counts
                raise ValueError(f"rebased.ops.Embedding does not take {option}; use nn.Embedding")
        super().__init__(num_embeddings, embedding_dim, **kwargs)
        check_choice("backend", backend, EMBEDDING_BACKENDS)
        self.backend = backend

    def forward(self, ids: Tensor) -> Tensor:
        return embedding(ids, self.weight, backend=self.backend)
