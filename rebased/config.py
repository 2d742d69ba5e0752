"""Frozen configuration dataclasses: the model and one sub-config per mixer kind.

A model is a per-layer pattern of mixer names (cycled over n_layers) plus, per name, that mixer's
sub-config. Names map to config factories in MIXER_CONFIGS (the presets "rebased" and "based" are the
linear-attention config with their feature map filled in); rebased.mixers.MIXERS maps the same names to
modules. Everything is validated at construction, with a message naming the field, and round-trips
through to_dict / from_dict (config.json).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rebased.ops.common import check_choice


def _fail(field_name: str, value: object, requirement: str) -> None:
    raise ValueError(f"{field_name}={value!r}: {requirement}")


def _check_heads(where: str, num_heads: int, d_model: int) -> None:
    if num_heads < 1 or d_model % num_heads:
        _fail(f"{where}.num_heads", num_heads, f"must be >= 1 and divide d_model={d_model}")


@dataclass(frozen=True)
class LinearAttentionConfig:
    """Linear attention with a registered feature map (official ReBased/Based MQAR defaults).

    q, k: d_model -> num_heads * feature_dim (the projected dim D, 16); v: d_model -> num_heads * (d_model //
    num_heads); out: back to d_model; no biases, as in the official code.
    """

    feature_map: str = "rebased"
    num_heads: int = 12
    feature_dim: int = 16
    feature_map_options: dict = field(default_factory=dict)
    eps: float | None = None  # None: the feature map's own eps (1e-12, the official value)
    mode: str = "auto"  # op mode for training and prefill: parallel at short T, chunk at long T
    backend: str = "auto"
    chunk_size: int = 64

    def validate(self, where: str, d_model: int) -> None:
        if self.num_heads < 1 or d_model // self.num_heads < 1:
            _fail(f"{where}.num_heads", self.num_heads, f"must be in [1, d_model={d_model}]")
        if self.feature_dim < 1:
            _fail(f"{where}.feature_dim", self.feature_dim, "must be >= 1")
        if self.chunk_size < 1:
            _fail(f"{where}.chunk_size", self.chunk_size, "must be >= 1")


@dataclass(frozen=True)
class AttentionConfig:
    """Causal softmax attention (torch SDPA), optional rotary embeddings, biases as in Zoology's MHA."""

    num_heads: int = 1
    rotary: bool = False
    rotary_base: float = 10000.0
    bias: bool = True

    def validate(self, where: str, d_model: int) -> None:
        _check_heads(where, self.num_heads, d_model)
        if self.rotary and (d_model // self.num_heads) % 2:
            _fail(f"{where}.rotary", self.rotary, f"needs an even head dim, got {d_model // self.num_heads}")


@dataclass(frozen=True)
class SlidingWindowConfig(AttentionConfig):
    """Softmax attention over the last `window` tokens (the token itself included)."""

    window: int = 64

    def validate(self, where: str, d_model: int) -> None:
        super().validate(where, d_model)
        if self.window < 1:
            _fail(f"{where}.window", self.window, "must be >= 1")


@dataclass(frozen=True)
class BaseConvConfig:
    """BaseConv. gated=False: the MQAR short conv y = conv(u) * Linear(u) + u. gated=True: the Based LM's
    y = out(conv(u1) * u2) with [u1, u2] = in_proj(u)."""

    kernel_size: int = 3
    gated: bool = False

    def validate(self, where: str, d_model: int) -> None:
        if self.kernel_size < 1:
            _fail(f"{where}.kernel_size", self.kernel_size, "must be >= 1")


@dataclass(frozen=True)
class HyenaConfig:
    max_len: int = 2048  # the implicit filter's length: the longest sequence the layer accepts
    short_kernel: int = 3
    filter_hidden: int = 64
    filter_emb: int = 5  # positional features of the filter MLP: t plus (filter_emb - 1) / 2 sin/cos bands

    def validate(self, where: str, d_model: int) -> None:
        for name in ("max_len", "short_kernel", "filter_hidden"):
            if getattr(self, name) < 1:
                _fail(f"{where}.{name}", getattr(self, name), "must be >= 1")
        if self.filter_emb < 3 or self.filter_emb % 2 == 0:
            _fail(f"{where}.filter_emb", self.filter_emb, "must be odd and >= 3")


@dataclass(frozen=True)
class MambaConfig:
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0  # 0: ceil(d_model / 16), as in Mamba
    chunk_size: int = 16

    def validate(self, where: str, d_model: int) -> None:
        for name in ("d_state", "d_conv", "expand", "chunk_size"):
            if getattr(self, name) < 1:
                _fail(f"{where}.{name}", getattr(self, name), "must be >= 1")
        if self.dt_rank < 0:
            _fail(f"{where}.dt_rank", self.dt_rank, "must be >= 0")


@dataclass(frozen=True)
class RWKVConfig:
    chunk_size: int = 32

    def validate(self, where: str, d_model: int) -> None:
        if self.chunk_size < 1:
            _fail(f"{where}.chunk_size", self.chunk_size, "must be >= 1")


MixerConfig = (
    LinearAttentionConfig
    | AttentionConfig
    | SlidingWindowConfig
    | BaseConvConfig
    | HyenaConfig
    | MambaConfig
    | RWKVConfig
)

# name -> factory of that mixer's sub-config with the name's defaults; rebased.mixers.MIXERS has the same keys.
MIXER_CONFIGS: dict[str, Callable[..., Any]] = {
    "linear_attention": LinearAttentionConfig,
    "rebased": functools.partial(LinearAttentionConfig, feature_map="rebased"),
    "based": functools.partial(LinearAttentionConfig, feature_map="taylor"),
    "attention": AttentionConfig,
    "sliding_window": SlidingWindowConfig,
    "base_conv": BaseConvConfig,
    "gated_base_conv": functools.partial(BaseConvConfig, gated=True),
    "hyena": HyenaConfig,
    "mamba": MambaConfig,
    "rwkv": RWKVConfig,
}
MLPS = ("none", "identity", "gelu", "swiglu")
NORMS = ("layernorm", "rmsnorm")


def mixer_config(name: str, **options) -> Any:
    """The sub-config for a mixer name; unknown names fail with a did-you-mean."""
    check_choice("mixer", name, MIXER_CONFIGS)
    try:
        return MIXER_CONFIGS[name](**options)
    except TypeError as error:
        raise ValueError(f"mixer {name!r} does not accept options {sorted(options)}: {error}") from None


@dataclass(frozen=True)
class ModelConfig:
    """A language model: embeddings, n_layers pre-norm blocks (mixer + optional MLP), final norm, head.

    mlp="identity" reproduces the Zoology / official ReBased MQAR block, whose "no MLP" is an Identity
    state mixer after its own norm: x = x + norm2(x). mlp="none" drops that sublayer altogether.
    """

    vocab_size: int = 8192
    d_model: int = 64
    n_layers: int = 2
    pattern: tuple[str, ...] = ("base_conv", "rebased")
    mixers: dict = field(default_factory=dict)  # name -> sub-config; names missing here get their defaults
    mlp: str = "identity"
    mlp_hidden: int = 0  # 0: 4 * d_model for GELU, 8/3 * d_model (rounded up to 64) for SwiGLU
    norm: str = "layernorm"
    norm_affine: bool = True
    norm_eps: float = 1e-5
    max_position_embeddings: int = 0  # > 0: learned absolute positions up to this length
    tie_embeddings: bool = True
    embed_dropout: float = 0.0
    resid_dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", tuple(self.pattern))
        for name in ("vocab_size", "d_model", "n_layers"):
            if getattr(self, name) < 1:
                _fail(name, getattr(self, name), "must be >= 1")
        if not self.pattern:
            _fail("pattern", self.pattern, "needs at least one mixer name")
        mixers = {}
        for name in self.pattern:
            given = self.mixers.get(name)
            mixers[name] = mixer_config(name) if given is None else given
        for name in self.mixers:
            if name not in self.pattern:
                _fail(f"mixers[{name!r}]", name, f"is not in pattern {self.pattern}")
        for name, cfg in mixers.items():
            cfg.validate(f"mixers[{name!r}]", self.d_model)
        object.__setattr__(self, "mixers", mixers)
        if self.mlp not in MLPS:
            _fail("mlp", self.mlp, f"must be one of {', '.join(MLPS)}")
        if self.norm not in NORMS:
            _fail("norm", self.norm, f"must be one of {', '.join(NORMS)}")
        for name in ("embed_dropout", "resid_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                _fail(name, getattr(self, name), "must be in [0, 1)")
        if self.max_position_embeddings < 0 or self.mlp_hidden < 0:
            _fail("max_position_embeddings / mlp_hidden", (self.max_position_embeddings, self.mlp_hidden), ">= 0")

    def layer_mixers(self) -> list[str]:
        """The mixer name of each layer: the pattern cycled over n_layers."""
        return [self.pattern[i % len(self.pattern)] for i in range(self.n_layers)]

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["pattern"] = list(self.pattern)
        out["mixers"] = {name: dataclasses.asdict(cfg) for name, cfg in self.mixers.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"model config has unknown fields {unknown}")
        data = dict(data)
        data["mixers"] = {name: mixer_config(name, **options) for name, options in data.get("mixers", {}).items()}
        return cls(**data)
