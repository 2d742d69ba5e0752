"""LayerNorm over the last dim, with an optional affine: torch, or one fused Triton pass on CUDA.

    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias

backend "torch" is F.layer_norm (the reference); "triton" normalises, applies the affine and writes y in the
dtype the next op takes (autocast's dtype under autocast, else x's) in one pass, with a backward that sums
the weight/bias gradients per program (rebased/ops/triton/layer_norm.py says why); "auto" takes triton for
CUDA tensors when triton is installed, at a version the GPU tests passed on (rebased.ops.triton.versions), and
covers the row, else torch. Explicit backends never fall back.
"""

from __future__ import annotations

import importlib

import torch.nn.functional as F
from torch import Tensor, nn

from rebased.ops.common import autocast_output_dtype, check_choice

NORM_BACKENDS = ("torch", "triton", "auto")
_FUSED_MODULE = "rebased.ops.triton.layer_norm"


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, *, backend: str = "auto") -> Tensor:
    check_choice("backend", backend, NORM_BACKENDS)
    from rebased.ops import auto_picks_triton, require_triton  # (rebased.ops imports this module)

    if backend == "auto":
        fused = auto_picks_triton(x) and x.shape[-1] <= importlib.import_module(_FUSED_MODULE).MAX_FEATURES
        backend = "triton" if fused else "torch"
    elif backend == "triton":
        require_triton("layer_norm(backend='triton')", x)
    if backend == "torch":
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    return importlib.import_module(_FUSED_MODULE).fused_layer_norm(x, weight, bias, eps, autocast_output_dtype(x))


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and state dict) over the last dim, through `layer_norm`'s backends."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        check_choice("backend", backend, NORM_BACKENDS)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        if len(self.normalized_shape) != 1:
            return super().forward(x)
        return layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)
