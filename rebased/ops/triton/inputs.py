"""What the fused kernels take: the polynomial as kernel arguments, and the refusals the pairs share.

The polynomial goes to every kernel as numbers (c0, c1, c2, scale and the feature coefficients) plus which
terms exist, so ReBased, Based and the square ablations are one kernel compiled per term pattern, not a copy
per kernel. q, k arriving already feature-mapped (kernel=None) are the linear kernel on dimension F: the same
state layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from rebased.ops.kernels import Polynomial
from rebased.ops.triton.launch import interpreting

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class PolynomialArgs:
    """One polynomial's kernel arguments: sim = c0 + c1 s + c2 s^2 with s = scale q.k, and the coefficients
    a_i of its features phi(x) = [a0, a1 x, a2 vec(x (x) x)] (a_i^2 = c_i scale^i)."""

    c0: float
    c1: float
    c2: float
    scale: float

    @classmethod
    def of(cls, kernel: Polynomial | None) -> PolynomialArgs:
        kernel = Polynomial.linear() if kernel is None else kernel
        return cls(kernel.c0, kernel.c1, kernel.c2, kernel.scale)

    def score_args(self) -> dict:
        """What the score tiles (tiles.masked_scores) take: the coefficients and which low terms exist."""
        return dict(scale=self.scale, c0=self.c0, c1=self.c1, c2=self.c2, HAS0=self.c0 > 0, HAS1=self.c1 > 0)

    def feature_args(self) -> dict:
        """a0, a1, a2: what phi's constant, linear and square parts are scaled by."""
        return dict(a0=math.sqrt(self.c0), a1=math.sqrt(self.c1 * self.scale), a2=math.sqrt(self.c2) * self.scale)

    def flags(self) -> dict[str, bool]:
        return dict(HAS0=self.c0 > 0, HAS1=self.c1 > 0, HAS2=self.c2 > 0)

    def kernel(self) -> Polynomial:
        return Polynomial(self.c0, self.c1, self.c2, self.scale)

    @property
    def clamp(self) -> bool:
        """Whether the normaliser is clamped at 0 (a non-negative kernel's can round below it)."""
        return self.kernel().non_negative


def check_dtype_and_device(what: str, *tensors: Tensor) -> None:
    """The refusals every fused kernel shares: dtype (one of SUPPORTED_DTYPES, the same for all) and device."""
    q = tensors[0]
    if q.dtype not in SUPPORTED_DTYPES:
        raise NotImplementedError(f"{what} supports float32, bfloat16 and float16, got {q.dtype}")
    if any(x.dtype != q.dtype for x in tensors):
        raise NotImplementedError(f"{what} needs one dtype for q, k, v, got {[str(x.dtype) for x in tensors]}")
    if not (q.is_cuda or interpreting()):
        raise NotImplementedError(f"{what} needs CUDA tensors (or TRITON_INTERPRET=1), got device {q.device}")


def check_head_dims(what: str, q: Tensor, v: Tensor, limit: int = 128) -> None:
    """The tiled kernels' (parallel, chunk-states) q/k and value dim limit: one tile holds a whole head."""
    if q.shape[-1] > limit or v.shape[-1] > limit:
        raise NotImplementedError(f"{what} covers q/k and value dims up to {limit}, got {q.shape[-1]}, {v.shape[-1]}")


def wants_gradients(*inputs: Tensor) -> bool:
    """Whether a backward will follow (needs_input_grad cannot tell: autograd sets it under no_grad too)."""
    return torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
