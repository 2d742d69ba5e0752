"""RWKV-4 time mixing (WKV) in pure PyTorch, in the numerically stable running-max form.

    x'_t = x_{t-1} (token shift);  k = W_k(mu_k x + (1 - mu_k) x'), v, r likewise;  w = -exp(time_decay) < 0
    wkv_t = (sum_{s<t} e^{w (t-1-s) + k_s} v_s + e^{u + k_t} v_t) / (sum_{s<t} e^{w (t-1-s) + k_s} + e^{u + k_t})
    out = W_o(sigmoid(r) * wkv)

wkv_t is a softmax-weighted average of v over the exponents above, so every exponential is taken after
subtracting the running max p: the state is (a, b, p) with a = sum e^{w (t-s) + k_s - p} v_s and b likewise,
per channel, and nothing overflows. Training runs in chunks: quadratic inside a chunk, (a, b, p) between.

Shape letters: B batch, T time, D model dim, Cs chunk size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from rebased.config import RWKVConfig
from rebased.mixers.base import Mixer
from rebased.ops.common import compute_dtype

_EMPTY = -1e38  # the running max before any token: exp(_EMPTY - anything finite) = 0, without inf - inf


class WKVState(NamedTuple):
    a: Tensor  # [B, D] fp32
    b: Tensor  # [B, D]
    p: Tensor  # [B, D]


def _wkv_chunk(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WKVState) -> tuple[Tensor, WKVState]:
    """k, v [B, Cs, D] (fp32); w, u [D] -> wkv [B, Cs, D] and the state after the chunk."""
    size = k.shape[1]
    t = torch.arange(size, device=k.device, dtype=k.dtype)
    gap = (t[:, None] - 1 - t[None, :]).unsqueeze(-1)  # [Cs(t), Cs(s), 1]: t - 1 - s
    exponents = gap * w + k.unsqueeze(1)  # [B, Cs(t), Cs(s), D]
    exponents = torch.where(gap >= 0, exponents, float("-inf"))
    diagonal = torch.eye(size, dtype=torch.bool, device=k.device).unsqueeze(-1)
    exponents = torch.where(diagonal, (u + k).unsqueeze(2), exponents)
    from_state = state.p.unsqueeze(1) + t[:, None] * w  # [B, Cs, D]: the prefix's weight at token t
    top = torch.maximum(from_state, exponents.amax(2)).detach()  # wkv does not depend on the shift
    weights, state_weight = (exponents - top.unsqueeze(2)).exp(), (from_state - top).exp()
    numerator = (weights * v.unsqueeze(1)).sum(2) + state_weight * state.a.unsqueeze(1)
    denominator = weights.sum(2) + state_weight * state.b.unsqueeze(1)
    to_end = (size - 1 - t)[:, None] * w + k  # [B, Cs, D]: each token's exponent after the chunk
    old = state.p + size * w
    p = torch.maximum(old, to_end.amax(1)).detach()
    scale, fresh = (old - p).exp(), (to_end - p.unsqueeze(1)).exp()
    new = WKVState(scale * state.a + (fresh * v).sum(1), scale * state.b + fresh.sum(1), p)
    return numerator / denominator, new


def wkv_step(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WKVState) -> tuple[Tensor, WKVState]:
    """One token, the standard stable recurrence: k, v [B, D] (fp32)."""
    top = torch.maximum(state.p, u + k)
    e_old, e_new = (state.p - top).exp(), (u + k - top).exp()
    out = (e_old * state.a + e_new * v) / (e_old * state.b + e_new)
    decayed = state.p + w
    p = torch.maximum(decayed, k)
    e_old, e_new = (decayed - p).exp(), (k - p).exp()
    return out, WKVState(e_old * state.a + e_new * v, e_old * state.b + e_new, p)


class RWKVState(NamedTuple):
    last_x: Tensor  # [B, D] the previous token's input (token shift)
    wkv: WKVState


class RWKV(Mixer):
    def __init__(self, d_model: int, cfg: RWKVConfig):
        super().__init__()
        self.cfg, self.d_model = cfg, d_model
        self.time_decay = nn.Parameter(torch.zeros(d_model))
        self.time_first = nn.Parameter(torch.zeros(d_model))
        self.time_mix_k = nn.Parameter(torch.zeros(d_model))
        self.time_mix_v = nn.Parameter(torch.zeros(d_model))
        self.time_mix_r = nn.Parameter(torch.zeros(d_model))
        self.key = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_model, d_model, bias=False)
        self.receptance = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.reset_special_parameters()

    def reset_special_parameters(self) -> None:
        """RWKV-4's init at a middle layer (depth ratio 0.5): decays spread over channels, u zig-zagging."""
        ratio, fading = 0.5, 0.5
        i = torch.arange(self.d_model, dtype=torch.float32)
        with torch.no_grad():
            self.time_decay.copy_(-5 + 8 * (i / max(self.d_model - 1, 1)) ** (0.7 + 1.3 * ratio))
            self.time_first.copy_(torch.log(torch.tensor(0.3)) + 0.5 * ((i + 1) % 3 - 1))
            self.time_mix_k.copy_((i / self.d_model) ** fading)
            self.time_mix_v.copy_((i / self.d_model) ** fading + 0.3 * ratio)
            self.time_mix_r.copy_((i / self.d_model) ** (0.5 * fading))

    def _krv(self, x: Tensor, shifted: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        def mix(mu: Tensor) -> Tensor:
            return x * mu + shifted * (1 - mu)

        return self.key(mix(self.time_mix_k)), self.receptance(mix(self.time_mix_r)), self.value(mix(self.time_mix_v))

    def _empty(self, x: Tensor) -> WKVState:
        zeros = x.new_zeros(x.shape[0], self.d_model, dtype=compute_dtype(x.dtype))
        return WKVState(zeros, zeros, torch.full_like(zeros, _EMPTY))

    def forward(self, x: Tensor) -> Tensor:
        return self.prefill(x)[0]

    def prefill(self, x: Tensor) -> tuple[Tensor, RWKVState]:  # x [B, T, D]
        shifted = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        k, r, v = self._krv(x, shifted)
        state, outputs = self._empty(x), []
        dtype = state.a.dtype
        w, u = -self.time_decay.to(dtype).exp(), self.time_first.to(dtype)
        for start in range(0, x.shape[1], self.cfg.chunk_size):
            part = slice(start, start + self.cfg.chunk_size)
            out, state = _wkv_chunk(w, u, k[:, part].to(dtype), v[:, part].to(dtype), state)
            outputs.append(out)
        wkv = torch.cat(outputs, dim=1).to(x.dtype)
        return self.out_proj(torch.sigmoid(r) * wkv), RWKVState(x[:, -1], state)

    def step(self, x: Tensor, state: RWKVState | None) -> tuple[Tensor, RWKVState]:  # x [B, D]
        shifted = torch.zeros_like(x) if state is None else state.last_x
        k, r, v = self._krv(x, shifted)
        wkv_state = self._empty(x) if state is None else state.wkv
        dtype = wkv_state.a.dtype
        w, u = -self.time_decay.to(dtype).exp(), self.time_first.to(dtype)
        wkv, new = wkv_step(w, u, k.to(dtype), v.to(dtype), wkv_state)
        return self.out_proj(torch.sigmoid(r) * wkv.to(x.dtype)), RWKVState(x, new)

    def state_elements(self, seq_len: int) -> tuple[int, int]:
        return 3 * self.d_model, self.d_model
