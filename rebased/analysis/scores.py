"""Normalised score matrices A [B, H, T, T] of a model's attention-like mixers, from its own parameters.

Each mixer's forward pass computes o_i = sum_j A[i, j] v_j per head, then out_proj; here A is built
explicitly from the same projections, feature map and kernel:

    linear attention   A[i, j] = sim(q'_i, k'_j) / (sum_{j' <= i} sim(q'_i, k'_j') + eps),  j <= i
                       (sim = kernel.similarity(q'.k') for polynomial kernels, phi(q).phi(k) otherwise;
                       maps with normalize=False keep the raw sim)
    softmax attention  A[i, j] = softmax_j(q_i . k_j / sqrt(Dh)) over j <= i (sliding window: i - j < w)

The input of each mixer (the block's norm1(x)) is captured with a forward pre-hook on a normal forward
pass, so nothing in the model changes. Tests hold out_proj(A v) equal to the mixer's own output.

Shape letters: B batch, H heads, T time, Dk q/k dim, Dv value head dim.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from rebased.mixers.attention import Attention, SlidingWindowAttention, rotary
from rebased.mixers.linear_attention import LinearAttention


class MixerScores(NamedTuple):
    scores: Tensor  # [B, H, T, T], row i is zero beyond column i
    values: Tensor  # [B, H, T, Dv]: what each row of scores weights


def is_analysable(mixer: nn.Module) -> bool:
    """True for the mixers with a score matrix: linear attention (ReBased, Based, ...) and softmax attention."""
    return isinstance(mixer, (LinearAttention, Attention))


def analysable_layers(model: nn.Module) -> list[int]:
    """Indices of the model's layers whose mixer has a score matrix (an MQAR model: [BaseConv, mixer] -> [1])."""
    return [i for i, layer in enumerate(model.layers) if is_analysable(layer.mixer)]


def mixer_scores(mixer: nn.Module, x: Tensor) -> MixerScores:
    """x [B, T, D], the mixer's input -> its score matrix [B, H, T, T] and values [B, H, T, Dv]."""
    if isinstance(mixer, LinearAttention):
        return _linear_attention_scores(mixer, x)
    if isinstance(mixer, Attention):
        return _softmax_scores(mixer, x)
    raise ValueError(f"{type(mixer).__name__} has no score matrix (only linear and softmax attention do)")


def _causal_mask(length: int, device: torch.device, window: int | None = None) -> Tensor:
    """[T, T] boolean: key j visible from query i (j <= i, and i - j < window when there is one)."""
    gap = torch.arange(length, device=device)[:, None] - torch.arange(length, device=device)[None, :]
    visible = gap >= 0
    return visible & (gap < window) if window is not None else visible


def _linear_attention_scores(mixer: LinearAttention, x: Tensor) -> MixerScores:
    # The same steps as LinearAttention._project: projections, heads split, the map's prepare() (LayerNorm
    # and affine for ReBased); then the kernel the op applies (kernel trick on q'.k', or explicit features).
    heads = mixer.cfg.num_heads
    q = mixer.proj_q(x).unflatten(-1, (heads, mixer.key_dim))  # [B, T, H, Dk]
    k = mixer.proj_k(x).unflatten(-1, (heads, mixer.key_dim))
    v = mixer.proj_v(x).unflatten(-1, (heads, mixer.value_dim))  # [B, T, H, Dv]
    fmap = mixer.feature_map
    q, k = fmap.prepare(q, k, 0)
    dots = torch.einsum("bihd,bjhd->bhij", q, k)  # [B, H, T, T]
    sim = dots if fmap.kernel is None else fmap.kernel.similarity(dots)
    sim = sim.masked_fill(~_causal_mask(x.shape[1], x.device), 0.0)
    if fmap.normalize:
        sim = sim / (sim.sum(-1, keepdim=True) + mixer.eps)
    return MixerScores(sim, v.transpose(1, 2))


def _softmax_scores(mixer: Attention, x: Tensor) -> MixerScores:
    # Attention._qkv: one projection split into q, k, v, rotary on q and k, heads first.
    q, k, v = mixer.qkv(x).unflatten(-1, (3, mixer.num_heads, mixer.head_dim)).unbind(2)  # [B, T, H, Dh]
    if mixer.cfg.rotary:
        q, k = rotary(q, 0, mixer.cfg.rotary_base), rotary(k, 0, mixer.cfg.rotary_base)
    logits = torch.einsum("bihd,bjhd->bhij", q, k) * mixer.head_dim**-0.5
    window = mixer.window if isinstance(mixer, SlidingWindowAttention) else None
    logits = logits.masked_fill(~_causal_mask(x.shape[1], x.device, window), float("-inf"))
    return MixerScores(logits.softmax(-1), v.transpose(1, 2))


def mixer_output(mixer: nn.Module, scores: MixerScores) -> Tensor:
    """out_proj(A v) [B, T, D]: what the mixer's forward returns, rebuilt from its score matrix."""
    o = scores.scores.to(scores.values.dtype) @ scores.values  # [B, H, T, Dv]
    return mixer.out_proj(o.transpose(1, 2).flatten(-2))


@torch.no_grad()
def capture_mixer_inputs(model: nn.Module, ids: Tensor, layers: list[int]) -> tuple[Tensor, dict[int, Tensor]]:
    """One forward pass of ids [B, T]: the logits [B, T, V] and each listed layer's mixer input [B, T, D]."""
    captured: dict[int, Tensor] = {}
    handles = [
        model.layers[i].mixer.register_forward_pre_hook(lambda module, args, i=i: captured.__setitem__(i, args[0]))
        for i in layers
    ]
    try:
        logits = model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return logits, captured


@torch.no_grad()
def score_matrices(model: nn.Module, ids: Tensor, layers: list[int] | None = None) -> tuple[Tensor, dict[int, Tensor]]:
    """ids [B, T] -> (logits [B, T, V], {layer: scores [B, H, T, T]}) for the listed analysable layers
    (default: all of them). The model should be in eval mode (dropout off) for the scores to be its own."""
    layers = analysable_layers(model) if layers is None else layers
    logits, inputs = capture_mixer_inputs(model, ids, layers)
    return logits, {i: mixer_scores(model.layers[i].mixer, inputs[i]).scores for i in layers}
