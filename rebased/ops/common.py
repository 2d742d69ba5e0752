"""What every linear-attention op shares: the state type, the eps constant, input validation, dtypes.

Shape letters: B batch, T time, H heads, D projected q/k dim, F feature dim, V value dim.
"""

from __future__ import annotations

import difflib
from typing import NamedTuple

import torch
from torch import Tensor

from rebased.ops.kernels import Polynomial

# The official ReBased and Based code divides by (normaliser + 1e-12). The division runs in fp32 (or
# fp64), where 1e-12 is representable; it only matters when the normaliser itself is ~0, and then it
# turns 0 / 0 into 0.
DEFAULT_EPS = 1e-12


class LinearAttentionState(NamedTuple):
    """The recurrent state after some prefix: kv = sum_s phi(k_s) v_s^T, k_sum = sum_s phi(k_s)."""

    kv: Tensor  # [B, H, F, V], fp32 (fp64 for fp64 inputs)
    k_sum: Tensor  # [B, H, F]


def check_choice(kind: str, value: object, options) -> str:
    """value if it is one of options (any iterable of names), else ValueError with a did-you-mean."""
    options = tuple(options)
    if value not in options:
        close = difflib.get_close_matches(str(value), options, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown {kind} {value!r}: choose one of {', '.join(options)}{hint}")
    return value  # type: ignore[return-value]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; everything else (bf16, fp16, fp32) is computed in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def feature_dim(head_dim: int, kernel: Polynomial | None) -> int:
    return head_dim if kernel is None else kernel.feature_dim(head_dim)


def features(x: Tensor, kernel: Polynomial | None) -> Tensor:
    """phi(x) for a kernel, or x itself when the inputs are already feature-mapped."""
    return x if kernel is None else kernel.features(x)


def similarity(dots: Tensor, kernel: Polynomial | None) -> Tensor:
    """sim from raw q . k products: p(q.k) for a kernel, the dot product itself for explicit features."""
    return dots if kernel is None else kernel.similarity(dots)


def check_tensor(name: str, x: object, rank: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(x.shape)}")
    return x


def validate_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: LinearAttentionState | tuple | None,
    kernel: Polynomial | None,
    eps: float,
) -> LinearAttentionState | None:
    """Raise ValueError naming the argument for anything malformed; return the state as a NamedTuple."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, 4)
    if q.shape != k.shape:
        raise ValueError(
            f"q and k must have the same shape [B, T, H, D], got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must match q in [B, T, H], got v {tuple(v.shape)} and q {tuple(q.shape)}")
    if q.shape[1] == 0:
        raise ValueError(f"sequence length T must be >= 1, got q {tuple(q.shape)}")
    if kernel is not None and not isinstance(kernel, Polynomial):
        raise ValueError(f"kernel must be a Polynomial or None, got {kernel!r}")
    if not (eps >= 0.0):
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if initial_state is None:
        return None
    return validate_state(initial_state, q.shape[0], q.shape[2], feature_dim(q.shape[-1], kernel), v.shape[-1])


def validate_state(state: object, batch: int, heads: int, feat: int, value_dim: int) -> LinearAttentionState:
    if not (isinstance(state, tuple) and len(state) == 2):
        raise ValueError(f"initial_state must be a (kv, k_sum) pair, got {type(state).__name__}")
    kv = check_tensor("initial_state.kv", state[0], 4)
    k_sum = check_tensor("initial_state.k_sum", state[1], 3)
    if tuple(kv.shape) != (batch, heads, feat, value_dim):
        raise ValueError(
            f"initial_state.kv must have shape {(batch, heads, feat, value_dim)} [B, H, F, V], got {tuple(kv.shape)}"
        )
    if tuple(k_sum.shape) != (batch, heads, feat):
        raise ValueError(
            f"initial_state.k_sum must have shape {(batch, heads, feat)} [B, H, F], got {tuple(k_sum.shape)}"
        )
    return LinearAttentionState(kv, k_sum)


def normalise(numerator: Tensor, denominator: Tensor, kernel: Polynomial | None, eps: float) -> Tensor:
    """numerator / (denominator + eps), in the working float dtype.

    For a non-negative kernel the exact denominator is >= 0; the feature-space term phi(q).z is a
    quadratic form of a PSD matrix that rounding can push a hair below zero, so it is clamped there
    rather than allowed to cross zero and blow the division up.
    """
    if kernel is not None and kernel.non_negative:
        denominator = denominator.clamp_min(0.0)
    return numerator / (denominator.unsqueeze(-1) + eps)


def autocast_output_dtype(x: Tensor) -> torch.dtype:
    """The dtype a fused op writes for the next one: autocast's on x's device under autocast, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
