"""Chunked form, linear in T: quadratic inside each chunk of C tokens, a feature-space state between chunks.

For chunk n (tokens nC .. nC + C - 1), with S_n, z_n the state of everything before the chunk:

    o = (mask_causal(sim(Q_n K_n^T)) V_n + phi(Q_n) S_n) / (mask_causal(sim(Q_n K_n^T)) 1 + phi(Q_n) z_n + eps)
    S_{n+1} = S_n + phi(K_n)^T V_n,   z_{n+1} = z_n + phi(K_n)^T 1

Inside a chunk the kernel trick gives sim = p(q.k) from the projected q, k (dimension D) without the D^2
features. Between chunks the state is in feature space: this torch version expands phi(K_n) and phi(Q_n)
once per token (F = 256 or 273 at D = 16), which costs less memory than the C x C scores for C >= F / 4;
the fused GPU kernel keeps the expansion in registers. All chunk states come from one cumulative sum,
so there is no Python loop over time.

Shape letters: B batch, T time, H heads, N chunks, C chunk size, D q/k dim, F feature dim, V value dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rebased.ops.common import LinearAttentionState, compute_dtype, features, normalise
from rebased.ops.kernels import Polynomial
from rebased.ops.parallel import add_state_terms, causal_scores, parallel_linear_attention


def _exclusive_cumsum(x: Tensor, dim: int) -> Tensor:
    """Prefix sums that leave each element out: [a, b, c] -> [0, a, a + b] (no subtract-back cancellation)."""
    shifted = torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), x.narrow(dim, 0, x.shape[dim] - 1)], dim=dim)
    return shifted.cumsum(dim)


def chunk_linear_attention(
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
    dtype = compute_dtype(q.dtype)
    length = q.shape[1]
    pad = (-length) % chunk_size
    num_chunks = (length + pad) // chunk_size

    def to_chunks(x: Tensor) -> Tensor:  # [B, T, H, *] -> [B, H, N, C, *]
        x = F.pad(x.transpose(1, 2).to(dtype), (0, 0, 0, pad))
        return x.unflatten(2, (num_chunks, chunk_size))

    if num_chunks == 1 and initial_state is None and not output_final_state:
        # One chunk and no state in or out: exactly the parallel form, without the feature expansion.
        return parallel_linear_attention(
            q, k, v, kernel=kernel, initial_state=None, output_final_state=False, normalize=normalize, eps=eps,
            chunk_size=chunk_size,
        )  # fmt: skip
    qc, kc, vc = to_chunks(q), to_chunks(k), to_chunks(v)
    scores = causal_scores(qc, kc, kernel)  # [B, H, N, C, C]
    numerator, denominator = scores @ vc, scores.sum(-1)

    phi_k = features(kc, kernel)  # [B, H, N, C, F]
    if pad:  # padded keys must not enter the state (phi(0) is not 0 when the kernel has a constant term)
        real = torch.arange(num_chunks * chunk_size, device=q.device) < length
        phi_k = phi_k * real.view(num_chunks, chunk_size, 1).to(dtype)
    kv_chunks = phi_k.transpose(-1, -2) @ vc  # [B, H, N, F, V]
    k_sum_chunks = phi_k.sum(-2)  # [B, H, N, F]
    kv_before, k_sum_before = _exclusive_cumsum(kv_chunks, 2), _exclusive_cumsum(k_sum_chunks, 2)
    if initial_state is not None:
        kv_before = kv_before + initial_state.kv.to(dtype).unsqueeze(2)
        k_sum_before = k_sum_before + initial_state.k_sum.to(dtype).unsqueeze(2)
    numerator, denominator = add_state_terms(numerator, denominator, features(qc, kernel), kv_before, k_sum_before)

    o = normalise(numerator, denominator, kernel, eps) if normalize else numerator
    o = o.flatten(2, 3)[:, :, :length].transpose(1, 2)  # [B, T, H, V]
    final_state = None
    if output_final_state:
        final_state = LinearAttentionState(
            kv_before[:, :, -1] + kv_chunks[:, :, -1], k_sum_before[:, :, -1] + k_sum_chunks[:, :, -1]
        )
    return o.to(v.dtype), final_state
