"""Polynomial similarity kernels: sim(q, k) = c0 + c1 * s + c2 * s^2, with s = scale * (q . k).

They cover ReBased ((q'.k'/sqrt(D))^2), Based (the Taylor expansion 1 + s + s^2/2 with s = q.k/sqrt(D)),
the square ablations and plain linear attention (s alone). A kernel with non-negative coefficients has
an explicit feature map, so the same numbers can be computed two ways:

    kernel trick:  sim(q, k) = p(scale * q.k)                         (work on the projected q, k: dim D)
    features:      sim(q, k) = phi(q) . phi(k),
                   phi(x) = [sqrt(c0), sqrt(c1 * scale) x, sqrt(c2) scale vec(x (x) x)]

Only the terms with a non-zero coefficient are kept, in that order: Based has 1 + D + D^2 = 273 features
at D = 16, ReBased D^2 = 256. The recurrent state lives in this feature space, so a state made by one
path is read by any other.

Shape letters: B batch, T time, H heads, D projected q/k dim, F feature dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Polynomial:
    """sim(q, k) = c0 + c1 * s + c2 * s^2 with s = scale * (q . k); coefficients are non-negative."""

    c0: float = 0.0
    c1: float = 0.0
    c2: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("c0", "c1", "c2"):
            value = getattr(self, name)
            if not (value >= 0.0 and math.isfinite(value)):
                raise ValueError(f"Polynomial.{name} must be finite and >= 0, got {value!r}")
        if self.c0 == self.c1 == self.c2 == 0.0:
            raise ValueError("Polynomial needs at least one non-zero coefficient, got c0 = c1 = c2 = 0")
        if not (self.scale > 0.0 and math.isfinite(self.scale)):
            raise ValueError(f"Polynomial.scale must be finite and > 0, got {self.scale!r}")

    @classmethod
    def rebased(cls, head_dim: int) -> Polynomial:
        """(q.k / sqrt(D))^2: the ReBased kernel and the square ablations."""
        return cls(c2=1.0, scale=head_dim**-0.5)

    @classmethod
    def taylor(cls, head_dim: int) -> Polynomial:
        """1 + s + s^2 / 2 with s = q.k / sqrt(D): Based's second-order Taylor expansion of exp(s)."""
        return cls(c0=1.0, c1=1.0, c2=0.5, scale=head_dim**-0.5)

    @classmethod
    def linear(cls) -> Polynomial:
        """q . k: plain (identity feature map) linear attention."""
        return cls(c1=1.0)

    @property
    def non_negative(self) -> bool:
        """True when sim(q, k) >= 0 for every q, k, so the normaliser can never cross zero."""
        if self.c1 == 0.0:
            return True
        # c0 + c1 s + c2 s^2 >= 0 for all s iff its discriminant is <= 0 (Based: min 0.5 at s = -1).
        return self.c2 > 0.0 and self.c1 * self.c1 <= 4.0 * self.c0 * self.c2

    def feature_dim(self, head_dim: int) -> int:
        return int(self.c0 > 0) + int(self.c1 > 0) * head_dim + int(self.c2 > 0) * head_dim * head_dim

    def similarity(self, dots: Tensor) -> Tensor:
        """p(scale * dots), elementwise; dots are raw q . k products."""
        s = dots * self.scale
        if self.c1 == 0.0 and self.c0 == 0.0:
            return s.square() * self.c2 if self.c2 != 1.0 else s.square()
        return self.c0 + s * self.c1 + s.square() * self.c2

    def features(self, x: Tensor) -> Tensor:
        """phi(x): [..., D] -> [..., F], with phi(q) . phi(k) == similarity(q . k)."""
        parts = []
        if self.c0 > 0:
            parts.append(torch.full_like(x[..., :1], math.sqrt(self.c0)))
        if self.c1 > 0:
            parts.append(x * math.sqrt(self.c1 * self.scale))
        if self.c2 > 0:
            outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)  # [..., D * D]
            parts.append(outer * (math.sqrt(self.c2) * self.scale))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
