"""Host-side pieces the Triton kernels share, and the decode step.

The polynomial goes to every kernel as numbers (_Poly: c0, c1, c2, scale and the feature coefficients) plus
which terms exist, so ReBased, Based and the square ablations are one kernel compiled per term pattern, not a
copy per kernel. q, k arriving already feature-mapped (kernel=None) are the linear kernel on dimension F: the
same state layout. Here too: the dot precision per input dtype, the refusals the pairs share (dtype, device,
head dims), whether the interpreter runs, and step_ (one decoding token, the state updated in place).

Shape letters: B batch, H heads, D q/k dim, F feature dim, V value dim.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import triton
from torch import Tensor
from triton.runtime.errors import OutOfResources

from rebased.ops.common import LinearAttentionState
from rebased.ops.kernels import Polynomial
from rebased.ops.triton.step_kernel import step_kernel

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class _Poly:
    """The kernel arguments for one polynomial (feature coefficients a_i with a_i^2 = c_i scale^i)."""

    c0: float
    c1: float
    c2: float
    scale: float

    @classmethod
    def of(cls, kernel: Polynomial | None) -> _Poly:
        kernel = Polynomial.linear() if kernel is None else kernel
        return cls(kernel.c0, kernel.c1, kernel.c2, kernel.scale)

    def args(self) -> tuple[float, ...]:
        a0, a1, a2 = math.sqrt(self.c0), math.sqrt(self.c1 * self.scale), math.sqrt(self.c2) * self.scale
        return (self.scale, self.c0, self.c1, self.c2, a0, a1, a2)

    def flags(self) -> dict[str, bool]:
        return dict(HAS0=self.c0 > 0, HAS1=self.c1 > 0, HAS2=self.c2 > 0)

    def kernel(self) -> Polynomial:
        return Polynomial(self.c0, self.c1, self.c2, self.scale)

    @property
    def clamp(self) -> bool:
        return self.kernel().non_negative


def _blocks(head_dim: int, poly: _Poly) -> tuple[int, int]:
    bd = max(16, triton.next_power_of_2(head_dim))
    return bd, (bd * bd if poly.c2 > 0 else 16)  # BD2 is unused without a quadratic term: keep it tiny


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs get fp32-accurate dots (three tf32 products, on tensor cores: a plain fp32 dot of these
    tiles spills tens of KiB a thread); 16-bit inputs let the fp32 state dots run in tf32."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


Rung = TypeVar("Rung")
_FITTING_RUNG: dict[tuple, int] = {}  # launch key -> index of the first rung of its ladder that fits


def launch_fitting(key: tuple, ladder: Sequence[Rung], launch: Callable[[Rung], None]) -> None:
    """launch(rung) with the first rung of ladder (the tuned launch first, then ones needing less shared
    memory) whose compiled kernel fits the GPU. A kernel's shared memory is known only once Triton has
    compiled it, and versions disagree (3.6 and 3.9 by up to 40% for one parallel kernel), so the step down
    is found by trying: Triton raises OutOfResources before the kernel runs, so a refused rung has done
    nothing. key: whatever decides the compile (kernel, dtype, constexprs); the rung found is remembered."""
    for index in range(_FITTING_RUNG.get(key, 0), len(ladder)):
        try:
            launch(ladder[index])
        except OutOfResources:
            if index == len(ladder) - 1:
                raise
            continue
        _FITTING_RUNG[key] = index
        return


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


STEP_SQUARE_DIM_LIMIT = 32  # the decode step's q/k dim limit with a quadratic term (see _check_dims)


def _check_dims(q: Tensor, kernel: Polynomial | None, what: str) -> None:
    """The decode step's q/k dim limits: 128, or 32 with a quadratic term (step_kernel's program holds the
    D^2 square features and a [D^2, BV] state tile; 32, 1024 features, is the largest it is tested at)."""
    if (kernel is None or kernel.c2 == 0) and q.shape[-1] > 128:
        raise NotImplementedError(f"{what} takes q, k without a quadratic term up to dim 128, got {q.shape[-1]}")
    if kernel is not None and kernel.c2 > 0 and q.shape[-1] > STEP_SQUARE_DIM_LIMIT:
        raise NotImplementedError(
            f"{what} supports quadratic kernels with q/k dim <= {STEP_SQUARE_DIM_LIMIT}, got {q.shape[-1]}"
        )


@torch.no_grad()
def step_(
    q: Tensor,  # [B, H, D]
    k: Tensor,  # [B, H, D]
    v: Tensor,  # [B, H, V]
    state: LinearAttentionState,  # fp32, contiguous; updated in place
    *,
    kernel: Polynomial | None = None,
    normalize: bool = True,
    eps: float = 1e-12,
) -> Tensor:
    """One decoding step (inference only, no autograd): adds phi(k) v^T to the state in place, returns o."""
    check_dtype_and_device("triton step", q)
    _check_dims(q, kernel, "triton step")
    kv, k_sum = state
    if kv.dtype != torch.float32 or k_sum.dtype != torch.float32 or not (kv.is_contiguous() and k_sum.is_contiguous()):
        raise ValueError("triton step updates the state in place: it must be contiguous float32")
    batch, heads, head_dim = q.shape
    value_dim = v.shape[-1]
    poly = _Poly.of(kernel)
    feat = kv.shape[2]
    bd, bd2 = _blocks(head_dim, poly)
    o = torch.empty_like(v)
    block_v = min(max(16, triton.next_power_of_2(value_dim)), max(16, 8192 // bd2))  # ~64 floats a thread
    step_kernel[(batch * heads,)](
        q.contiguous(), k.contiguous(), v.contiguous(), o, kv, k_sum, head_dim, value_dim, feat, *poly.args()[4:], eps,
        BD=bd, BD2=bd2, BV=block_v, **poly.flags(), NORMALIZE=normalize, CLAMP=poly.clamp,
        num_warps=4,
    )  # fmt: skip
    return o
