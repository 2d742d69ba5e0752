"""Mamba (selective state space model): the scan of rebased.ops.selective_scan for training and prefill, a
recurrent step for decoding.

    [x, z] = W_in u;  x = silu(shortconv(x));  [dt, B, C] = W_x x;  dt = softplus(W_dt dt + b_dt)
    h_t = exp(dt_t A) * h_{t-1} + (dt_t x_t) B_t^T          h [Din, N], A = -exp(A_log) < 0
    y_t = h_t C_t + D * x_t;   out = W_out(y * silu(z))

Shape letters: B batch, T time, D model dim, Din inner dim (expand * D), N state dim, R dt rank.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rebased.config import MambaConfig
from rebased.mixers.base import Mixer, ShortConv
from rebased.ops.common import compute_dtype
from rebased.ops.scan import selective_scan


class MambaState(NamedTuple):
    conv: Tensor  # [B, K - 1, Din]
    ssm: Tensor  # [B, Din, N], fp32 (fp64 for fp64 inputs)


class Mamba(Mixer):
    def __init__(self, d_model: int, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        self.d_inner = cfg.expand * d_model
        self.dt_rank = cfg.dt_rank or math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv = ShortConv(self.d_inner, cfg.d_conv)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * cfg.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner)
        self.A_log = nn.Parameter(
            torch.log(torch.arange(1, cfg.d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1)
        )
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.scan_backend = "auto"  # rebased.ops.selective_scan's backend
        self.reset_special_parameters()

    def reset_special_parameters(self) -> None:
        """Mamba's dt init: softplus(b_dt) log-uniform in [1e-3, 0.1] (the model's generic init zeroes biases)."""
        with torch.no_grad():
            nn.init.uniform_(self.dt_proj.weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp_min(1e-4)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def _ssm_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        dt, b, c = self.x_proj(x).split([self.dt_rank, self.cfg.d_state, self.cfg.d_state], dim=-1)
        return F.softplus(self.dt_proj(dt)), b, c

    def forward(self, u: Tensor) -> Tensor:
        return self.prefill(u)[0]

    def prefill(self, u: Tensor) -> tuple[Tensor, MambaState]:  # u [B, T, D]
        x, z = self.in_proj(u).chunk(2, dim=-1)
        x, conv_state = self.conv.prefill(x)
        x = F.silu(x)
        dt, b, c = self._ssm_inputs(x)
        h = x.new_zeros(x.shape[0], self.d_inner, self.cfg.d_state, dtype=compute_dtype(x.dtype))
        y, h = selective_scan(x, dt, -self.A_log.exp(), b, c, h, chunk=self.cfg.chunk_size, backend=self.scan_backend)
        y = y.to(x.dtype) + x * self.D
        return self.out_proj(y * F.silu(z)), MambaState(conv_state, h)

    def step(self, u: Tensor, state: MambaState | None) -> tuple[Tensor, MambaState]:  # u [B, D]
        x, z = self.in_proj(u).chunk(2, dim=-1)
        x, conv_state = self.conv.step(x, None if state is None else state.conv)
        x = F.silu(x)
        dtype = compute_dtype(x.dtype)
        dt, b, c = (t.to(dtype) for t in self._ssm_inputs(x))
        h = x.new_zeros(x.shape[0], self.d_inner, self.cfg.d_state, dtype=dtype) if state is None else state.ssm
        h = torch.exp(dt.unsqueeze(-1) * -self.A_log.to(dtype).exp()) * h + (dt * x.to(dtype)).unsqueeze(
            -1
        ) * b.unsqueeze(1)
        y = (h * c.unsqueeze(1)).sum(-1).to(x.dtype) + x * self.D
        return self.out_proj(y * F.silu(z)), MambaState(conv_state, h)

    def state_elements(self, seq_len: int) -> tuple[int, int]:
        return self.d_inner * self.cfg.d_state, (self.cfg.d_conv - 1) * self.d_inner
