"""Convolutional mixers: BaseConv (MQAR), gated BaseConv (Based LM), Hyena (implicit long convolution).

    BaseConv:        y = shortconv_K(u) * (W u + b) + u                       (official ReBased / Zoology)
    gated BaseConv:  [u1, u2] = W_in u;  y = W_out(shortconv_K(u1) * u2)     (HazyResearch/based)
    Hyena (order 2): [x1, x2, v] = shortconv(W_in u);  y = W_out(x2 * (h * (x1 * v) + d * x1 * v))
                     h [D, L]: an implicit filter, MLP(positional features) * exp(-decay t), convolved by FFT

State: the short conv's last K - 1 inputs; Hyena also keeps every long-conv input seen (its filter spans
the whole context, so its generation state grows like a KV cache).

Shape letters: B batch, T time, D model dim, K short kernel, L filter length.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from rebased.config import BaseConvConfig, HyenaConfig
from rebased.mixers.base import Mixer, ShortConv
from rebased.ops.common import compute_dtype


class BaseConv(Mixer):
    def __init__(self, d_model: int, cfg: BaseConvConfig):
        super().__init__()
        self.cfg = cfg
        self.gated = cfg.gated
        if cfg.gated:
            self.in_proj = nn.Linear(d_model, 2 * d_model)
            self.out_proj = nn.Linear(d_model, d_model)
        else:
            self.projection = nn.Linear(d_model, d_model)
        self.conv = ShortConv(d_model, cfg.kernel_size)
        self.d_model = d_model

    def _combine(self, u: Tensor, conv_in: Tensor, conv_out: Tensor, gate: Tensor) -> Tensor:
        if self.gated:
            return self.out_proj(conv_out * gate)
        return conv_out * self.projection(u) + u

    def _split(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """(input of the conv, gate) for the gated form; (u, unused) for the plain one."""
        if self.gated:
            return self.in_proj(u).chunk(2, dim=-1)
        return u, u

    def forward(self, u: Tensor) -> Tensor:  # [B, T, D]
        conv_in, gate = self._split(u)
        return self._combine(u, conv_in, self.conv(conv_in), gate)

    def prefill(self, u: Tensor) -> tuple[Tensor, Tensor]:
        conv_in, gate = self._split(u)
        conv_out, state = self.conv.prefill(conv_in)
        return self._combine(u, conv_in, conv_out, gate), state

    def step(self, u: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:  # u [B, D]
        conv_in, gate = self._split(u)
        conv_out, state = self.conv.step(conv_in, state)
        return self._combine(u, conv_in, conv_out, gate), state

    def state_elements(self, seq_len: int) -> tuple[int, int]:
        return 0, (self.cfg.kernel_size - 1) * self.d_model


class _Sin(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.freq = nn.Parameter(torch.ones(1, dim))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.freq * x)


class HyenaFilter(nn.Module):
    """h [D, L] = MLP(t, sin/cos bands of t) * exp(-decay_d * t/L): Hyena's implicit long filter."""

    def __init__(self, d_model: int, cfg: HyenaConfig):
        super().__init__()
        length, bands = cfg.max_len, (cfg.filter_emb - 1) // 2
        t = torch.linspace(0, 1, length)[:, None]  # [L, 1]
        angle = 2 * math.pi * torch.arange(length)[:, None] / length * torch.linspace(1e-4, bands - 1, bands)
        self.register_buffer("z", torch.cat([t, angle.cos(), -angle.sin()], dim=-1), persistent=False)  # [L, E]
        self.register_buffer("t", t, persistent=False)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.filter_emb, cfg.filter_hidden),
            _Sin(cfg.filter_hidden),
            nn.Linear(cfg.filter_hidden, cfg.filter_hidden),
            _Sin(cfg.filter_hidden),
            nn.Linear(cfg.filter_hidden, d_model, bias=False),
        )
        # decay rates spread so that channels see from ~the whole context down to a few tokens
        fast, slow = math.log(1e-2) / 0.3, math.log(1e-2) / 1.5
        self.register_buffer("decay", torch.linspace(slow, fast, d_model).abs(), persistent=False)

    def forward(self, length: int) -> Tensor:
        h = self.mlp(self.z[:length]) * torch.exp(-self.t[:length] * self.decay)  # [T, D]
        return h.t()  # [D, T]


def fft_causal_conv(v: Tensor, h: Tensor) -> Tensor:
    """y_t = sum_{s<=t} h[:, t - s] v_s for v [B, T, D], h [D, T]; zero-padded to 2T, so no wrap-around."""
    length = v.shape[1]
    size = 2 * length
    dtype = compute_dtype(v.dtype)  # fp32 at least: bf16 FFTs lose the small filter taps
    spectrum = torch.fft.rfft(v.to(dtype), n=size, dim=1) * torch.fft.rfft(h.to(dtype).t(), n=size, dim=0)
    y = torch.fft.irfft(spectrum, n=size, dim=1)
    return y[:, :length].to(v.dtype)


class HyenaState(NamedTuple):
    conv: Tensor  # [B, K - 1, 3D] short-conv tail
    history: Tensor  # [B, T, D] every long-conv input so far


class Hyena(Mixer):
    fixed_size_state = False  # the long convolution needs every input so far

    def __init__(self, d_model: int, cfg: HyenaConfig):
        super().__init__()
        self.cfg, self.d_model = cfg, d_model
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.short = ShortConv(3 * d_model, cfg.short_kernel)
        self.filter = HyenaFilter(d_model, cfg)
        self.filter_bias = nn.Parameter(torch.randn(d_model))  # d: the filter's direct (t - s = 0) term
        self.out_proj = nn.Linear(d_model, d_model)
        self.reset_special_parameters()

    def reset_special_parameters(self) -> None:
        """The filter MLP keeps PyTorch's default init: at std 0.02 its sines would give a near-zero filter."""
        for module in self.filter.mlp:
            if isinstance(module, nn.Linear):
                module.reset_parameters()

    def _check(self, length: int) -> None:
        if length > self.cfg.max_len:
            raise ValueError(f"sequence length {length} exceeds the Hyena filter length max_len={self.cfg.max_len}")

    def _gates(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Short-conv output [..., 3D] -> (long-conv input x1 * v, output gate x2)."""
        x1, x2, v = z.chunk(3, dim=-1)
        return x1 * v, x2

    def forward(self, u: Tensor) -> Tensor:
        return self.prefill(u)[0]

    def prefill(self, u: Tensor) -> tuple[Tensor, HyenaState]:
        self._check(u.shape[1])
        z, conv_state = self.short.prefill(self.in_proj(u))
        v, gate = self._gates(z)
        y = fft_causal_conv(v, self.filter(u.shape[1])) + v * self.filter_bias
        return self.out_proj(y * gate), HyenaState(conv_state, v)

    def step(self, u: Tensor, state: HyenaState | None) -> tuple[Tensor, HyenaState]:
        z, conv_state = self.short.step(self.in_proj(u), None if state is None else state.conv)
        v, gate = self._gates(z)
        history = v.unsqueeze(1) if state is None else torch.cat([state.history, v.unsqueeze(1)], dim=1)
        length = history.shape[1]
        self._check(length)
        h = self.filter(length).flip(-1)  # [D, T]: h[:, t - s] lined up with history[:, s]
        y = torch.einsum("btd,dt->bd", history, h.to(history.dtype)) + v * self.filter_bias
        return self.out_proj(y * gate), HyenaState(conv_state, history)

    def state_elements(self, seq_len: int) -> tuple[int, int]:
        return 0, (self.cfg.short_kernel - 1) * 3 * self.d_model + seq_len * self.d_model

    def static_state(self, state: HyenaState, capacity: int) -> HyenaState:
        raise NotImplementedError("Hyena has no fixed-size decoding state: it keeps every long-convolution input")
