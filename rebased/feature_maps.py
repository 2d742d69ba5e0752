"""Feature maps phi for linear attention, chosen by name: make_feature_map("rebased", head_dim=16, num_heads=12).

A map turns the projected q, k [B, T, H, D] into what `rebased.ops.linear_attention` takes:

    q', k' = fmap.prepare(q, k)        # the learnable / normalising part
    linear_attention(q', k', v, kernel=fmap.kernel, normalize=fmap.normalize, eps=fmap.eps)

Polynomial maps (ReBased, Based, the square ablations, identity) keep q', k' at dimension D and state
their kernel, sim = kernel.similarity(q'.k'), so the ops can use the kernel trick; `fmap(q, k)` gives the
explicit features phi(q'), phi(k') (dimension fmap.feature_dim) for any consumer that wants them. The
other maps have no kernel: prepare() already returns the features.

Kernels (s = q'.k'):
  rebased         q' = gamma_q norm(q) + beta_q, k' likewise;  (s / sqrt(D))^2           F = D^2
  square          (s / sqrt(D))^2 on the raw q, k                                         F = D^2
  norm_square     norm(x), no affine;      gamma_square  gamma x;    affine_square  gamma x + beta
  taylor (Based)  1 + s / sqrt(D) + s^2 / (2 D)                                           F = 1 + D + D^2
  identity        s (not non-negative: use normalize=False)                               F = D
  relu, elu_plus_one (alias pos_elu), cosformer, performer, hedgehog: no closed form in s.

Shape letters: B batch, T time, H heads, D projected dim, F feature dim.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rebased.ops.common import DEFAULT_EPS, check_choice
from rebased.ops.kernels import Polynomial
from rebased.ops.norm import affine, layer_norm

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, as in the official ReBased code


class FeatureMap(nn.Module):
    """Base class. Subclasses set feature_dim and kernel, and implement prepare()."""

    kernel: Polynomial | None = None
    normalize: bool = True  # divide by the normaliser; False for maps whose similarity can be negative
    heads_fixed: bool = False  # parameters per head (or over all heads jointly): inputs must have num_heads heads
    eps: float = DEFAULT_EPS
    backend: str = "auto"  # for the maps' LayerNorms (rebased.ops.norm); the mixer sets its own backend here

    def __init__(self, head_dim: int, num_heads: int):
        super().__init__()
        if head_dim < 1 or num_heads < 1:
            raise ValueError(f"head_dim and num_heads must be >= 1, got head_dim={head_dim}, num_heads={num_heads}")
        self.head_dim, self.num_heads = head_dim, num_heads
        self.feature_dim = head_dim

    def prepare(self, q: Tensor, k: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        """q, k [B, T, H, D] -> the op's inputs; offset is the position of the first token (cosformer)."""
        raise NotImplementedError

    def check_inputs(self, q: Tensor, k: Tensor) -> None:
        """ValueError unless q and k end in [..., D] with this map's head_dim (its kernel's scale, its
        parameters and feature_dim are built for it) and, where the map's parameters are per head or span all
        heads, in [..., H, D] with its num_heads."""
        for name, x in (("q", q), ("k", k)):
            if x.dim() < 2 or x.shape[-1] != self.head_dim or (self.heads_fixed and x.shape[-2] != self.num_heads):
                dims = f"{self.num_heads}, {self.head_dim}" if self.heads_fixed else f"{self.head_dim}"
                expected = f"[..., {dims}]"
                raise ValueError(
                    f"{type(self).__name__}(head_dim={self.head_dim}, num_heads={self.num_heads}) takes {name} "
                    f"{expected} (heads, head dim), got {name} of shape {list(x.shape)}"
                )

    def forward(self, q: Tensor, k: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        """Explicit features phi(q), phi(k): [B, T, H, F]."""
        q, k = self.prepare(q, k, offset)
        if self.kernel is None:
            return q, k
        return self.kernel.features(q), self.kernel.features(k)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, num_heads={self.num_heads}, feature_dim={self.feature_dim}"


class _ScaleShift(nn.Module):
    """Optional LayerNorm, then optional gamma * x + beta, over `shape` (the trailing dims it covers)."""

    def __init__(self, shape: tuple[int, ...], normalise: bool, gamma: bool, beta: bool):
        super().__init__()
        self.shape, self.normalise = shape, normalise
        self.weight = nn.Parameter(torch.ones(shape)) if gamma else None
        self.bias = nn.Parameter(torch.zeros(shape)) if beta else None

    def forward(self, x: Tensor, backend: str = "auto") -> Tensor:
        if self.normalise:
            return layer_norm(x, self.weight, self.bias, LAYER_NORM_EPS, backend=backend)
        return affine(x, self.weight, self.bias, backend=backend)


class QuadraticMap(FeatureMap):
    """(s / sqrt(D))^2 after an optional norm and affine: ReBased and its ablations (paper Table 1).

    scope="joint" (official ReBased code): q and k get separate LayerNorms over all heads jointly
    (H * D features), gamma and beta per head and feature. scope="per_head" (flash-linear-attention's
    port): one LayerNorm over each head's D features, gamma and beta shared by all heads and by q and k.
    """

    def __init__(
        self, head_dim: int, num_heads: int = 1, *, normalise: bool, gamma: bool, beta: bool, scope: str = "joint"
    ):
        super().__init__(head_dim, num_heads)
        if scope not in ("joint", "per_head"):
            raise ValueError(f"scope must be 'joint' or 'per_head', got {scope!r}")
        self.scope = scope
        self.heads_fixed = scope == "joint" and (normalise or gamma or beta)  # the norm / affine spans H * D
        self.kernel = Polynomial.rebased(head_dim)
        self.feature_dim = self.kernel.feature_dim(head_dim)
        shape = (num_heads * head_dim,) if scope == "joint" else (head_dim,)
        self.q_norm = _ScaleShift(shape, normalise, gamma, beta)
        self.k_norm = _ScaleShift(shape, normalise, gamma, beta) if scope == "joint" else self.q_norm

    def prepare(self, q: Tensor, k: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        self.check_inputs(q, k)
        if self.scope == "per_head":
            return self.q_norm(q, self.backend), self.k_norm(k, self.backend)
        q = self.q_norm(q.flatten(-2), self.backend).unflatten(-1, q.shape[-2:])
        return q, self.k_norm(k.flatten(-2), self.backend).unflatten(-1, k.shape[-2:])


class PolynomialMap(FeatureMap):
    """A fixed polynomial of the raw q.k: Based's Taylor map, or the identity map (plain q.k).

    The identity's similarity can be negative, so its output is not normalised (normalize=False).
    """

    def __init__(self, head_dim: int, num_heads: int = 1, *, polynomial: str):
        super().__init__(head_dim, num_heads)
        self.kernel = {"taylor": Polynomial.taylor(head_dim), "linear": Polynomial.linear()}[polynomial]
        self.feature_dim = self.kernel.feature_dim(head_dim)
        self.normalize = self.kernel.non_negative

    def prepare(self, q: Tensor, k: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        self.check_inputs(q, k)
        return q, k


class ElementwiseMap(FeatureMap):
    """phi(x) = f(x) elementwise: ReLU, or elu(x) + 1 (Katharopoulos et al.; Based's PosELU)."""

    def __init__(self, head_dim: int, num_heads: int = 1, *, activation: str):
        super().__init__(head_dim, num_heads)
        self.activation = {"relu": F.relu, "elu_plus_one": lambda x: F.elu(x) + 1.0}[activation]

    def prepare(self, q: Tensor, k: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        self.check_inputs(q, k)
        return self.activation(q), self.activation(k)


class CosFormerMap(FeatureMap):
    """cosFormer: phi(x_i) = [relu(x) sin(pi i / 2M), relu(x) cos(pi i / 2M)], i = 1, 2, ...

    phi(q_i).phi(k_j) = relu(q).relu(k) cos(pi (i - j) / 2M). The original uses M = the sequence length,
    which is not causal; here M = max_len is fixed, so decoding step by step gives the same numbers.
    """

    def __init__(self, head_dim: int, num_heads: int = 1, *, max_len: int = 2048):
        super().__init__(head_dim, num_heads)
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.max_len = max_len
        self.feature_dim = 2 * head_dim

    def _features(self, x: Tensor, offset: int | Tensor) -> Tensor:
        # fp64 angles: a [T] vector, and fp32 positions lose digits past 2^24 / max_len steps.
        positions = torch.arange(1, 1 + x.shape[1], device=x.device, dtype=torch.float64) + offset
        angle = (math.pi / (2 * self.max_len) * positions).view(1, -1, 1, 1)
        x = F.relu(x)
        return torch.cat([x * angle.sin().to(x.dtype), x * angle.cos().to(x.dtype)], dim=-1)

    def prepare(self, q: Tensor, k: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        self.check_inputs(q, k)
        return self._features(q, offset), self._features(k, offset)


class PerformerMap(FeatureMap):
    """FAVOR+ positive random features: phi(x) = exp(w.x - |x|^2 / 2) / sqrt(m), x scaled by D^(-1/4).

    E[phi(q).phi(k)] = exp(q.k / sqrt(D)), the softmax kernel. w are orthogonal Gaussian rows drawn once
    from `generator` and kept as a buffer. w.x - |x|^2/2 = (|w|^2 - |x - w|^2) / 2 <= |w|^2 / 2, so the
    exponent is bounded above by construction: no stabiliser needed, nothing overflows.
    """

    def __init__(
        self,
        head_dim: int,
        num_heads: int = 1,
        *,
        num_features: int | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__(head_dim, num_heads)
        num_features = num_features or 4 * head_dim
        self.feature_dim = num_features
        self.register_buffer("projection", _orthogonal_gaussian(num_features, head_dim, generator))

    def _features(self, x: Tensor) -> Tensor:
        x = x * self.head_dim**-0.25
        exponent = x @ self.projection.to(x.dtype).t() - 0.5 * x.square().sum(-1, keepdim=True)
        return exponent.exp() * self.feature_dim**-0.5

    def prepare(self, q: Tensor, k: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        self.check_inputs(q, k)
        return self._features(q), self._features(k)


def _orthogonal_gaussian(rows: int, dim: int, generator: torch.Generator | None) -> Tensor:
    """rows x dim matrix: blocks of orthonormal rows, each row rescaled to a chi-distributed norm."""
    blocks = []
    for _ in range(math.ceil(rows / dim)):
        q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
        # QR's sign convention biases Q; fixing the signs by diag(R) makes it uniformly (Haar) distributed.
        blocks.append((q * torch.sign(torch.diagonal(r))).t())
    norms = torch.randn(rows, dim, generator=generator).norm(dim=-1, keepdim=True)
    return torch.cat(blocks)[:rows] * norms


class HedgehogMap(FeatureMap):
    """Hedgehog: a learnable per-head linear map, then phi(x) = [softmax(W x + b), softmax(-(W x + b))].

    Separate maps for q and k, initialised to the identity. Features are positive and sum to 2.
    """

    heads_fixed = True  # a linear map per head

    def __init__(self, head_dim: int, num_heads: int = 1):
        super().__init__(head_dim, num_heads)
        self.feature_dim = 2 * head_dim
        eye = torch.eye(head_dim).expand(num_heads, head_dim, head_dim)
        self.q_weight, self.k_weight = nn.Parameter(eye.clone()), nn.Parameter(eye.clone())
        self.q_bias, self.k_bias = (
            nn.Parameter(torch.zeros(num_heads, head_dim)),
            nn.Parameter(torch.zeros(num_heads, head_dim)),
        )

    @staticmethod
    def _features(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        y = torch.einsum("bthd,hed->bthe", x, weight) + bias
        return torch.cat([y.softmax(-1), (-y).softmax(-1)], dim=-1)

    def prepare(self, q: Tensor, k: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        self.check_inputs(q, k)
        return self._features(q, self.q_weight, self.q_bias), self._features(k, self.k_weight, self.k_bias)


FEATURE_MAPS = {
    "rebased": functools.partial(QuadraticMap, normalise=True, gamma=True, beta=True),
    "square": functools.partial(QuadraticMap, normalise=False, gamma=False, beta=False),
    "norm_square": functools.partial(QuadraticMap, normalise=True, gamma=False, beta=False),
    "gamma_square": functools.partial(QuadraticMap, normalise=False, gamma=True, beta=False),
    "affine_square": functools.partial(QuadraticMap, normalise=False, gamma=True, beta=True),
    "taylor": functools.partial(PolynomialMap, polynomial="taylor"),
    "identity": functools.partial(PolynomialMap, polynomial="linear"),
    "relu": functools.partial(ElementwiseMap, activation="relu"),
    "elu_plus_one": functools.partial(ElementwiseMap, activation="elu_plus_one"),
    "pos_elu": functools.partial(ElementwiseMap, activation="elu_plus_one"),  # Based's name for elu + 1
    "cosformer": CosFormerMap,
    "performer": PerformerMap,
    "hedgehog": HedgehogMap,
}


def make_feature_map(name: str, head_dim: int, num_heads: int = 1, **options) -> FeatureMap:
    """Build a registered feature map; unknown names and options fail with ValueError."""
    check_choice("feature map", name, FEATURE_MAPS)
    try:
        return FEATURE_MAPS[name](head_dim, num_heads, **options)
    except TypeError as error:  # an option this map does not take
        raise ValueError(f"feature map {name!r} does not accept options {sorted(options)}: {error}") from None
