"""Sequence mixers, chosen by name: make_mixer("rebased", d_model=64) or make_mixer(name, d_model, cfg).

MIXERS has the same names as rebased.config.MIXER_CONFIGS; each module follows the contract in
rebased.mixers.base (forward, prefill, step, state_elements).
"""

from __future__ import annotations

from rebased.config import mixer_config
from rebased.mixers.attention import Attention, SlidingWindowAttention
from rebased.mixers.base import Mixer, ShortConv
from rebased.mixers.conv import BaseConv, Hyena
from rebased.mixers.linear_attention import LinearAttention, from_fla
from rebased.mixers.mamba import Mamba
from rebased.mixers.rwkv import RWKV

MIXERS: dict[str, type[Mixer]] = {
    "linear_attention": LinearAttention,
    "rebased": LinearAttention,
    "based": LinearAttention,
    "attention": Attention,
    "sliding_window": SlidingWindowAttention,
    "base_conv": BaseConv,
    "gated_base_conv": BaseConv,
    "hyena": Hyena,
    "mamba": Mamba,
    "rwkv": RWKV,
}


def make_mixer(name: str, d_model: int, cfg=None, **options) -> Mixer:
    """Build the mixer `name`; cfg is its sub-config (default: the name's defaults updated by options)."""
    if cfg is None:
        cfg = mixer_config(name, **options)
    elif options:
        raise ValueError(f"make_mixer: give either cfg or options, got both (options {sorted(options)})")
    cfg.validate(name, d_model)
    return MIXERS[name](d_model, cfg)


__all__ = ["MIXERS", "Mixer", "ShortConv", "from_fla", "make_mixer"]
