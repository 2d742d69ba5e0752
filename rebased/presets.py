"""Named model presets, as Python functions returning a ModelConfig: PRESETS[name](**overrides).

mqar_model(mixer, d_model, seq_len)  the paper's MQAR models: [BaseConv, mixer], no MLP
pile_150m(kind)                      the Pile ~150M models of ReBased Table 2: rebased, based, attention
based_360m()                         the Based LM layout: 60% gated BaseConv, 20% Taylor linear attention,
                                     20% sliding window, SwiGLU MLPs, RMSNorm
tiny(mixer) / tiny_hybrid()          small CPU models for tests and smoke runs
"""

from __future__ import annotations

from collections.abc import Callable

from rebased.config import ModelConfig, mixer_config

MQAR_VOCAB = 8192
GPT_NEOX_VOCAB = 50277  # the GPT-NeoX-20B tokenizer used by Based / ReBased on the Pile

# Mixer options in the MQAR models: 12 heads of feature dim 16 for Based/ReBased, 1 head for attention.
_MQAR_OPTIONS = {
    "rebased": {"num_heads": 12, "feature_dim": 16},
    "based": {"num_heads": 12, "feature_dim": 16},
    "linear_attention": {"num_heads": 12, "feature_dim": 16},
    "attention": {"num_heads": 1},
    "sliding_window": {"num_heads": 1},
}
# Mamba and RWKV run as stacks of themselves (as in Zoology), the others after a BaseConv layer.
_MQAR_PATTERNS = {"mamba": ("mamba",), "rwkv": ("rwkv",)}


def mqar_model(mixer: str = "rebased", d_model: int = 64, seq_len: int = 256, **overrides) -> ModelConfig:
    """The paper's MQAR model (official ReBased / Zoology harness): vocab 8192, learned positions up to
    seq_len, two pre-norm blocks [BaseConv, mixer], Identity MLP (the official "no MLP"), embedding
    dropout 0.1, tied head. At d_model 64, L 256: Based 577,984 and ReBased 578,752 parameters (Table 6)."""
    pattern = _MQAR_PATTERNS.get(mixer, ("base_conv", mixer))
    mixers = {mixer: mixer_config(mixer, **_MQAR_OPTIONS.get(mixer, {}))}
    cfg = ModelConfig(
        vocab_size=MQAR_VOCAB,
        d_model=d_model,
        n_layers=2,
        pattern=pattern,
        mixers=mixers,
        mlp="identity",
        max_position_embeddings=seq_len,
        embed_dropout=0.1,
    )
    return cfg.replace(**overrides)


def pile_150m(kind: str = "rebased", **overrides) -> ModelConfig:
    """ReBased Table 2 models: d_model 768, 12 heads. rebased / based: 18 layers alternating BaseConv and the
    linear-attention mixer (feature dim 16); attention: 12 layers of softmax attention, head dim 64, rotary.
    GELU MLPs, LayerNorm, tied embeddings; about 150M parameters with the GPT-NeoX vocabulary."""
    linear = {"rebased", "based"}
    if kind not in linear | {"attention"}:
        raise ValueError(f"pile_150m: kind must be 'rebased', 'based' or 'attention', got {kind!r}")
    if kind == "attention":
        layers, pattern, mixers = (
            12,
            ("attention",),
            {"attention": mixer_config("attention", num_heads=12, rotary=True)},
        )
    else:
        layers, pattern = 18, ("base_conv", kind)
        mixers = {kind: mixer_config(kind, num_heads=12, feature_dim=16)}
    cfg = ModelConfig(
        vocab_size=GPT_NEOX_VOCAB, d_model=768, n_layers=layers, pattern=pattern, mixers=mixers, mlp="gelu"
    )
    return cfg.replace(**overrides)


def based_360m(window: int = 128, **overrides) -> ModelConfig:
    """The Based 360M layout: 27 layers, d_model 1024; the cycle [conv, taylor, conv, window, conv] gives
    60% gated BaseConv, 20% Taylor linear attention (16 heads, d' 16), 20% sliding window; SwiGLU, RMSNorm."""
    pattern = ("gated_base_conv", "based", "gated_base_conv", "sliding_window", "gated_base_conv")
    mixers = {
        "based": mixer_config("based", num_heads=16, feature_dim=16),
        "sliding_window": mixer_config("sliding_window", num_heads=16, window=window, rotary=True, bias=False),
    }
    cfg = ModelConfig(
        vocab_size=GPT_NEOX_VOCAB,
        d_model=1024,
        n_layers=27,
        pattern=pattern,
        mixers=mixers,
        mlp="swiglu",
        norm="rmsnorm",
    )
    return cfg.replace(**overrides)


# Small mixer options that fit a d_model of 32.
_TINY_OPTIONS = {
    "rebased": {"num_heads": 2, "feature_dim": 8},
    "based": {"num_heads": 2, "feature_dim": 8},
    "linear_attention": {"num_heads": 2, "feature_dim": 8},
    "attention": {"num_heads": 2, "rotary": True},
    "sliding_window": {"num_heads": 2, "window": 8, "rotary": True},
    "hyena": {"max_len": 256, "filter_hidden": 16},
    "mamba": {"d_state": 8},
}


def tiny(mixer: str = "rebased", d_model: int = 32, vocab_size: int = 256, **overrides) -> ModelConfig:
    """A 2-layer CPU model [BaseConv, mixer] with a GELU MLP, for tests and smoke runs."""
    cfg = ModelConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=2,
        pattern=("base_conv", mixer) if mixer != "base_conv" else ("base_conv",),
        mixers={mixer: mixer_config(mixer, **_TINY_OPTIONS.get(mixer, {}))},
        mlp="gelu",
    )
    return cfg.replace(**overrides)


def tiny_hybrid(d_model: int = 32, vocab_size: int = 256, **overrides) -> ModelConfig:
    """based_360m's layout at CPU size: 5 layers, SwiGLU, RMSNorm."""
    return based_360m(
        n_layers=5,
        d_model=d_model,
        vocab_size=vocab_size,
        mixers={
            "based": mixer_config("based", **_TINY_OPTIONS["based"]),
            "sliding_window": mixer_config("sliding_window", **_TINY_OPTIONS["sliding_window"]),
        },
        **overrides,
    )


PRESETS: dict[str, Callable[..., ModelConfig]] = {
    "mqar": mqar_model,
    "pile_150m": pile_150m,
    "based_360m": based_360m,
    "tiny": tiny,
    "tiny_hybrid": tiny_hybrid,
}


def preset(name: str, **options) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name](**options)
