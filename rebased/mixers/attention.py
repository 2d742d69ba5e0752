"""Softmax attention (full causal, KV cache) and sliding-window attention (ring buffer of w tokens).

    o_t = sum_{s in S(t)} softmax_s(q_t . k_s / sqrt(Dh)) v_s,   S(t) = [0, t] (full) or (t - w, t] (window)

Optional rotary embeddings rotate q and k by their absolute positions before the product, so cached keys
keep their rotation. Sliding-window training splits T into blocks of w queries that each see their own
block and the one before (2w keys): memory O(T w), linear in T.

Shape letters: B batch, T time, H heads, Dh head dim, N blocks, W window.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rebased.config import AttentionConfig, SlidingWindowConfig
from rebased.mixers.base import Mixer
from rebased.ops.common import compute_dtype


def rotary(x: Tensor, offset: int | Tensor, base: float) -> Tensor:
    """Rotate halves of x [B, T, H, Dh] by angle (offset + t) * base^(-2i / Dh); in fp32 (fp64 for fp64).
    offset: an int, or a 0-dim tensor on x's device (decoding under a CUDA graph)."""
    half, dtype = x.shape[-1] // 2, compute_dtype(x.dtype)
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=dtype) / half)
    positions = torch.arange(x.shape[1], device=x.device, dtype=dtype) + offset
    angles = (positions[:, None] * inv_freq).view(1, x.shape[1], 1, half)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.to(dtype)[..., :half], x.to(dtype)[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class KVCache(NamedTuple):
    k: Tensor  # [B, H, T, Dh] (rotated)
    v: Tensor  # [B, H, T, Dh]
    position: int  # tokens seen so far


class StaticKVCache(NamedTuple):
    """Preallocated keys and values for fast decoding: slot p holds position p (full attention) or
    p mod w (sliding window); each step writes its slot in place and masks the slots not yet written."""

    k: Tensor  # [B, H, slots, Dh]
    v: Tensor


def write_and_attend(q: Tensor, k: Tensor, v: Tensor, cache: StaticKVCache, slot: Tensor, filled: Tensor) -> Tensor:
    """q, k, v [B, H, 1, Dh]: k, v into `slot` of the cache, then q over the filled slots [slots] (bool)."""
    cache.k.index_copy_(2, slot.view(1), k)
    cache.v.index_copy_(2, slot.view(1), v)
    return F.scaled_dot_product_attention(q, cache.k, cache.v, attn_mask=filled.view(1, 1, 1, -1))


class Attention(Mixer):
    """Causal multi-head softmax attention through torch's scaled_dot_product_attention."""

    def __init__(self, d_model: int, cfg: AttentionConfig):
        super().__init__()
        self.cfg = cfg
        self.num_heads, self.head_dim = cfg.num_heads, d_model // cfg.num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=cfg.bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=cfg.bias)

    def _qkv(self, x: Tensor, offset: int) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, D] -> q, k, v [B, H, T, Dh], q and k rotated to positions offset .. offset + T - 1."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(2)  # [B, T, H, Dh] each
        if self.cfg.rotary:
            q, k = rotary(q, offset, self.cfg.rotary_base), rotary(k, offset, self.cfg.rotary_base)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _out(self, o: Tensor) -> Tensor:  # [B, H, T, Dh] -> [B, T, D]
        return self.out_proj(o.transpose(1, 2).flatten(-2))

    def _causal(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def forward(self, x: Tensor) -> Tensor:
        return self._out(self._causal(*self._qkv(x, 0)))

    def prefill(self, x: Tensor) -> tuple[Tensor, KVCache]:
        q, k, v = self._qkv(x, 0)
        return self._out(self._causal(q, k, v)), self._cache(k, v, x.shape[1])

    def _cache(self, k: Tensor, v: Tensor, length: int) -> KVCache:
        return KVCache(k, v, length)

    def step(self, x: Tensor, state: KVCache | None) -> tuple[Tensor, KVCache]:
        position = 0 if state is None else state.position
        q, k, v = self._qkv(x.unsqueeze(1), position)
        if state is not None:
            k, v = torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2)
        o = F.scaled_dot_product_attention(q, k, v)  # the one query sees every cached token
        return self._out(o)[:, 0], KVCache(k, v, position + 1)

    def state_elements(self, seq_len: int) -> tuple[int, int]:
        return 0, 2 * seq_len * self.num_heads * self.head_dim

    def static_state(self, state: KVCache, capacity: int) -> StaticKVCache:
        """The prompt's keys and values in a cache of `capacity` slots (rounded up to 64: aligned rows for SDPA)."""
        batch, heads, length, head_dim = state.k.shape
        slots = -(-capacity // 64) * 64
        if length > capacity:
            raise ValueError(f"the prompt has {length} tokens, more than the cache's capacity {capacity}")
        k, v = (state.k.new_zeros(batch, heads, slots, head_dim) for _ in range(2))
        k[:, :, :length], v[:, :, :length] = state.k, state.v
        return StaticKVCache(k, v)

    def step_static(self, x: Tensor, state: StaticKVCache, position: Tensor) -> Tensor:
        q, k, v = self._qkv(x.unsqueeze(1), position)
        filled = torch.arange(state.k.shape[2], device=x.device) <= position
        return self._out(write_and_attend(q, k, v, state, position, filled))[:, 0]


class SlidingWindowAttention(Attention):
    """Each token attends to itself and the w - 1 before it; generation keeps a ring buffer of w tokens."""

    def __init__(self, d_model: int, cfg: SlidingWindowConfig):
        super().__init__(d_model, cfg)
        self.window = cfg.window

    def _causal(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        w, length = self.window, q.shape[2]
        pad = (-length) % w
        blocks = (length + pad) // w

        def to_blocks(x: Tensor) -> Tensor:  # [B, H, T, Dh] -> [B, H, N, W, Dh]
            return F.pad(x, (0, 0, 0, pad)).unflatten(2, (blocks, w))

        qb, kb, vb = to_blocks(q), to_blocks(k), to_blocks(v)
        k2 = torch.cat([F.pad(kb, (0, 0, 0, 0, 1, 0))[:, :, :-1], kb], dim=3)  # [B, H, N, 2W, Dh]: previous + own
        v2 = torch.cat([F.pad(vb, (0, 0, 0, 0, 1, 0))[:, :, :-1], vb], dim=3)
        gap = torch.arange(w, device=q.device)[:, None] + w - torch.arange(2 * w, device=q.device)  # query - key
        allowed = ((gap >= 0) & (gap < w)).expand(blocks, w, 2 * w).clone()  # [N, W, 2W]
        allowed[0, :, :w] = False  # the first block has no previous block (those keys are padding)
        o = F.scaled_dot_product_attention(qb, k2, v2, attn_mask=allowed)
        return o.flatten(2, 3)[:, :, :length]

    def _cache(self, k: Tensor, v: Tensor, length: int) -> KVCache:
        """Ring buffer: position p lives in slot p % w; only the last w positions are kept."""
        keep = torch.arange(max(0, length - self.window), length, device=k.device)
        shape = (*k.shape[:2], self.window, k.shape[-1])
        ring_k = k.new_zeros(shape).index_copy(2, keep % self.window, k[:, :, keep])
        ring_v = v.new_zeros(shape).index_copy(2, keep % self.window, v[:, :, keep])
        return KVCache(ring_k, ring_v, length)

    def step(self, x: Tensor, state: KVCache | None) -> tuple[Tensor, KVCache]:
        if state is None:
            empty = x.new_zeros(x.shape[0], self.num_heads, 0, self.head_dim)
            state = self._cache(empty, empty, 0)
        position = state.position
        q, k, v = self._qkv(x.unsqueeze(1), position)
        slot = torch.tensor([position % self.window], device=x.device)
        ring_k, ring_v = state.k.index_copy(2, slot, k), state.v.index_copy(2, slot, v)
        filled = (torch.arange(self.window, device=x.device) <= position).view(1, -1)  # slots not yet written are empty
        o = F.scaled_dot_product_attention(q, ring_k, ring_v, attn_mask=filled)
        return self._out(o)[:, 0], KVCache(ring_k, ring_v, position + 1)

    def state_elements(self, seq_len: int) -> tuple[int, int]:
        return 0, 2 * self.window * self.num_heads * self.head_dim

    def static_state(self, state: KVCache, capacity: int) -> StaticKVCache:
        return StaticKVCache(state.k.contiguous(), state.v.contiguous())  # the ring buffer has a fixed size

    def step_static(self, x: Tensor, state: StaticKVCache, position: Tensor) -> Tensor:
        q, k, v = self._qkv(x.unsqueeze(1), position)
        filled = torch.arange(self.window, device=x.device) <= position
        return self._out(write_and_attend(q, k, v, state, position % self.window, filled))[:, 0]
