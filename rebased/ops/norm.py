"""LayerNorm over the last dim, with an optional affine: torch, or one fused Triton pass on CUDA; and the affine
alone through the same two backends.

    layer_norm:  y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias
    affine:      y = x * weight + bias

backend "torch" is F.layer_norm (the reference); "triton" normalises, applies the affine and writes y in the
dtype the next op takes (autocast's dtype under autocast, else x's) in one pass, with a backward that sums
the weight/bias gradients per program (rebased/ops/triton/layer_norm.py says why); "auto" takes triton for
CUDA tensors when triton is installed, at a version the GPU tests passed on (rebased.ops.triton.versions), and
covers the row, else torch. Explicit backends never fall back. affine's torch backend is x * weight + bias in
torch's type promotion (fp32 for a bf16 x and fp32 parameters); its triton backend writes the dtype the next op
takes, as layer_norm's does; its "auto" also waits for AFFINE_TRITON_ON_GPU.
"""

from __future__ import annotations

import importlib

import torch.nn.functional as F
from torch import Tensor, nn

from rebased.ops.common import autocast_output_dtype, check_choice

NORM_BACKENDS = ("torch", "triton", "auto")
_FUSED_MODULE = "rebased.ops.triton.layer_norm"
# Whether affine's "auto" may take the kernels (the LayerNorm's without the norm) on a GPU: off until their GPU
# test (tests/test_layer_norm.py -m gpu) has passed on the device and the ablation's step has timed them
# (benchmarks/mqar_cost_gpu.py --variants graph-committed,graph-committed-triton-affine --pairs 32
# --cells gamma_square:48:2048).
AFFINE_TRITON_ON_GPU = False


def _resolve(backend: str, x: Tensor, what: str, enabled: bool = True) -> str:
    """The backend this call runs, torch or triton (the module docstring gives the rule for "auto")."""
    from rebased.ops import pick_backend  # (rebased.ops imports this module)

    fits = lambda: x.shape[-1] <= importlib.import_module(_FUSED_MODULE).MAX_FEATURES  # noqa: E731
    return pick_backend(backend, x, what, enabled=enabled, fits=fits)


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, *, backend: str = "auto") -> Tensor:
    if _resolve(backend, x, "layer_norm") == "torch":
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    return importlib.import_module(_FUSED_MODULE).fused_layer_norm(x, weight, bias, eps, autocast_output_dtype(x))


def affine(x: Tensor, weight: Tensor | None, bias: Tensor | None, *, backend: str = "auto") -> Tensor:
    """x * weight + bias over the last dim (either may be None; with neither, x itself)."""
    backend = _resolve(backend, x, "affine", enabled=AFFINE_TRITON_ON_GPU)
    if weight is None and bias is None:
        return x
    if backend == "torch":
        x = x * weight if weight is not None else x
        return x + bias if bias is not None else x
    return importlib.import_module(_FUSED_MODULE).fused_affine(x, weight, bias, autocast_output_dtype(x))


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
