"""RWKV-4 time mixing.

    x'_t = x_{t-1} (token shift);  k = W_k(mu_k x + (1 - mu_k) x'), v, r likewise;  w = -exp(time_decay) < 0
    wkv_t = (sum_{s<t} e^{w (t-1-s) + k_s} v_s + e^{u + k_t} v_t) / (sum_{s<t} e^{w (t-1-s) + k_s} + e^{u + k_t})
    out = W_o(sigmoid(r) * wkv)

The WKV itself is rebased.ops.rwkv (the numerically stable running-max form: a torch chunked form, or Triton
kernels), in fp32 (fp64 for fp64 inputs) whatever the projections' dtype.

Shape letters: B batch, T time, D model dim.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from rebased.config import RWKVConfig
from rebased.mixers.base import Mixer
from rebased.ops.common import compute_dtype
from rebased.ops.rwkv import WKVState, empty_state, wkv, wkv_step


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
        self.wkv_backend = "auto"  # rebased.ops.rwkv's backend
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

    def _decay_and_bonus(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return -self.time_decay.to(dtype).exp(), self.time_first.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.prefill(x)[0]

    def prefill(self, x: Tensor) -> tuple[Tensor, RWKVState]:  # x [B, T, D]
        shifted = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        k, r, v = self._krv(x, shifted)
        dtype = compute_dtype(x.dtype)
        w, u = self._decay_and_bonus(dtype)
        out, state = wkv(w, u, k, v, chunk=self.cfg.chunk_size, backend=self.wkv_backend)
        return self.out_proj(torch.sigmoid(r) * out.to(x.dtype)), RWKVState(x[:, -1], state)

    def step(self, x: Tensor, state: RWKVState | None) -> tuple[Tensor, RWKVState]:  # x [B, D]
        shifted = torch.zeros_like(x) if state is None else state.last_x
        k, r, v = self._krv(x, shifted)
        if state is None:
            wkv_state = empty_state(x.shape[0], self.d_model, x.new_empty(0, dtype=compute_dtype(x.dtype)))
        else:
            wkv_state = state.wkv
        dtype = wkv_state.a.dtype
        w, u = self._decay_and_bonus(dtype)
        out, new = wkv_step(w, u, k.to(dtype), v.to(dtype), wkv_state)
        return self.out_proj(torch.sigmoid(r) * out.to(x.dtype)), RWKVState(x, new)

    def state_elements(self, seq_len: int) -> tuple[int, int]:
        return 3 * self.d_model, self.d_model
