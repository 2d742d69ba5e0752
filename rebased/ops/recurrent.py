"""Recurrent form: a scan over time with an O(1) state, and the single-token step used for decoding.

    S_t = S_{t-1} + phi(k_t) v_t^T,   z_t = z_{t-1} + phi(k_t)
    o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps)

State in fp32 (fp64 for fp64 inputs): z only grows, and bf16 would drop small increments.

Shape letters: B batch, T time, H heads, D q/k dim, F feature dim, V value dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rebased.ops.common import LinearAttentionState, compute_dtype, feature_dim, features, normalise
from rebased.ops.kernels import Polynomial


def zero_state(
    batch: int, heads: int, feat: int, value_dim: int, *, dtype: torch.dtype, device
) -> LinearAttentionState:
    return LinearAttentionState(
        torch.zeros(batch, heads, feat, value_dim, dtype=dtype, device=device),
        torch.zeros(batch, heads, feat, dtype=dtype, device=device),
    )


def step_unchecked(
    q: Tensor,  # [B, H, D]
    k: Tensor,  # [B, H, D]
    v: Tensor,  # [B, H, V]
    state: LinearAttentionState,
    kernel: Polynomial | None,
    normalize: bool,
    eps: float,
) -> tuple[Tensor, LinearAttentionState]:
    """One token, out of place (so autograd can run through a scan of steps)."""
    dtype = state.kv.dtype
    phi_q, phi_k = features(q.to(dtype), kernel), features(k.to(dtype), kernel)  # [B, H, F]
    kv = state.kv + phi_k.unsqueeze(-1) * v.to(dtype).unsqueeze(-2)  # [B, H, F, V]
    k_sum = state.k_sum + phi_k
    o = (phi_q.unsqueeze(-2) @ kv).squeeze(-2)  # [B, H, V]
    if normalize:
        o = normalise(o, (phi_q * k_sum).sum(-1), kernel, eps)
    return o, LinearAttentionState(kv, k_sum)


def recurrent_linear_attention(
    q: Tensor,  # [B, T, H, D]
    k: Tensor,  # [B, T, H, D]
    v: Tensor,  # [B, T, H, V]
    *,
    kernel: Polynomial | None,
    initial_state: LinearAttentionState | None,
    output_final_state: bool,
    normalize: bool,
    eps: float,
    chunk_size: int,
) -> tuple[Tensor, LinearAttentionState | None]:
    del chunk_size  # one token at a time
    dtype = compute_dtype(q.dtype)
    batch, length, heads, head_dim = q.shape
    if initial_state is None:
        state = zero_state(batch, heads, feature_dim(head_dim, kernel), v.shape[-1], dtype=dtype, device=q.device)
    else:
        state = LinearAttentionState(initial_state.kv.to(dtype), initial_state.k_sum.to(dtype))
    outputs = []
    for t in range(length):
        o_t, state = step_unchecked(q[:, t], k[:, t], v[:, t], state, kernel, normalize, eps)
        outputs.append(o_t)
    o = torch.stack(outputs, dim=1)  # [B, T, H, V]
    return o.to(v.dtype), (state if output_final_state else None)
