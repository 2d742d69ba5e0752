"""Mamba (selective state space model) in pure PyTorch: a chunked scan for training, a recurrent step.

    [x, z] = W_in u;  x = silu(shortconv(x));  [dt, B, C] = W_x x;  dt = softplus(W_dt dt + b_dt)
    h_t = exp(dt_t A) * h_{t-1} + (dt_t x_t) B_t^T          h [Din, N], A = -exp(A_log) < 0
    y_t = h_t C_t + D * x_t;   out = W_out(y * silu(z))

Chunked scan (no loop over time steps; a loop over T / Cs chunks): inside a chunk, with the cumulative
log-decay L_t = sum_{s<=t} dt_s A (<= 0 and decreasing),
    h_t = exp(L_t) h_0 + sum_{s<=t} exp(L_t - L_s) (dt_s x_s) B_s^T,
and every exponent is <= 0, so nothing overflows; entries with s > t are set to -inf before exp.

Shape letters: B batch, T time, D model dim, Din inner dim (expand * D), N state dim, Cs chunk size, R dt rank.
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


def _scan_chunk(x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """One chunk: x, dt [B, Cs, Din]; a [Din, N]; b, c [B, Cs, N]; h [B, Din, N] -> y [B, Cs, Din], h."""
    log_decay = (dt.unsqueeze(-1) * a).cumsum(1)  # [B, Cs, Din, N]: L_t
    size = x.shape[1]
    causal = torch.ones(size, size, dtype=torch.bool, device=x.device).tril().view(1, size, size, 1, 1)
    gaps = log_decay.unsqueeze(2) - log_decay.unsqueeze(1)  # [B, Cs(t), Cs(s), Din, N]: L_t - L_s
    decay = torch.where(causal, gaps, float("-inf")).exp()
    inputs = dt * x  # [B, Cs, Din]
    weights = torch.einsum("btn,btsdn,bsn->btsd", c, decay, b)
    y = torch.einsum("btsd,bsd->btd", weights, inputs) + torch.einsum("btn,btdn,bdn->btd", c, log_decay.exp(), h)
    to_end = (log_decay[:, -1:] - log_decay).exp()  # [B, Cs, Din, N]: exp(L_end - L_s)
    h = log_decay[:, -1].exp() * h + torch.einsum("bsdn,bsn,bsd->bdn", to_end, b, inputs)
    return y, h


def selective_scan(x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor, h: Tensor, chunk: int):
    """x, dt [B, T, Din]; b, c [B, T, N]; h [B, Din, N] -> y [B, T, Din], final h; in h's dtype (fp32 or fp64)."""
    x, dt, a, b, c = (t.to(h.dtype) for t in (x, dt, a, b, c))
    outputs = []
    for start in range(0, x.shape[1], chunk):
        part = slice(start, start + chunk)
        y, h = _scan_chunk(x[:, part], dt[:, part], a, b[:, part], c[:, part], h)
        outputs.append(y)
    return torch.cat(outputs, dim=1), h


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
        y, h = selective_scan(x, dt, -self.A_log.exp(), b, c, h, self.cfg.chunk_size)
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
