"""Parallel (quadratic) form: the whole masked T x T score matrix at once.

    A = mask_causal(sim(Q K^T))          sim = p(q.k) by the kernel trick, or the features' dot product
    o = (A V + phi(Q) S_0) / (A 1 + phi(Q) z_0 + eps)

O(T^2) time and memory; the fastest torch form for short T, and what the analyses read scores from.
Everything runs in fp32 (fp64 for fp64 inputs); o comes back in v's dtype, the state in fp32.

Shape letters: B batch, T time, H heads, D q/k dim, F feature dim, V value dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rebased.ops.common import LinearAttentionState, compute_dtype, features, normalise, similarity
from rebased.ops.kernels import Polynomial


def causal_scores(q: Tensor, k: Tensor, kernel: Polynomial | None) -> Tensor:
    """sim(q_t, k_s) for s <= t, zero above the diagonal: [..., T, D] x [..., T, D] -> [..., T, T]."""
    scores = similarity(q @ k.transpose(-1, -2), kernel)
    length = q.shape[-2]
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~causal, 0.0)


def add_state_terms(
    numerator: Tensor, denominator: Tensor, phi_q: Tensor, kv: Tensor, k_sum: Tensor
) -> tuple[Tensor, Tensor]:
    """Adds what earlier tokens contribute: phi(q) S and phi(q) z (phi_q [..., T, F], kv [..., F, V])."""
    return numerator + phi_q @ kv, denominator + (phi_q @ k_sum.unsqueeze(-1)).squeeze(-1)


def parallel_linear_attention(
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
    del chunk_size  # one block: the whole sequence
    dtype = compute_dtype(q.dtype)
    q, k, vv = (x.transpose(1, 2).to(dtype) for x in (q, k, v))  # [B, H, T, *]
    scores = causal_scores(q, k, kernel)  # [B, H, T, T]
    numerator, denominator = scores @ vv, scores.sum(-1)
    if initial_state is not None:
        numerator, denominator = add_state_terms(
            numerator, denominator, features(q, kernel), initial_state.kv.to(dtype), initial_state.k_sum.to(dtype)
        )
    o = normalise(numerator, denominator, kernel, eps) if normalize else numerator
    final_state = None
    if output_final_state:
        phi_k = features(k, kernel)  # [B, H, T, F]
        kv, k_sum = phi_k.transpose(-1, -2) @ vv, phi_k.sum(-2)
        if initial_state is not None:
            kv, k_sum = kv + initial_state.kv.to(dtype), k_sum + initial_state.k_sum.to(dtype)
        final_state = LinearAttentionState(kv, k_sum)
    return o.transpose(1, 2).to(v.dtype), final_state
