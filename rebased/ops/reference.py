"""The specification: causal linear attention, slow and plain, in float64.

    S_t = S_0 + sum_{s<=t} phi(k_s) v_s^T        z_t = z_0 + sum_{s<=t} phi(k_s)
    o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps)        (normalize=True)
    o_t = phi(q_t)^T S_t                                   (normalize=False)

phi is the kernel's explicit feature map (or the identity when q, k arrive feature-mapped). Every fast
path is tested against this loop; it is never used for work.

Shape letters: B batch, T time, H heads, D q/k dim, F feature dim, V value dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rebased.ops.common import DEFAULT_EPS, LinearAttentionState, features, validate_inputs
from rebased.ops.kernels import Polynomial


def linear_attention_reference(
    q: Tensor,  # [B, T, H, D]
    k: Tensor,  # [B, T, H, D]
    v: Tensor,  # [B, T, H, V]
    *,
    kernel: Polynomial | None = None,
    initial_state: LinearAttentionState | None = None,
    output_final_state: bool = False,
    normalize: bool = True,
    eps: float = DEFAULT_EPS,
) -> tuple[Tensor, LinearAttentionState | None]:
    """Returns o [B, T, H, V] and the final state, both float64."""
    state = validate_inputs(q, k, v, initial_state, kernel, eps)
    phi_q = features(q.double(), kernel)  # [B, T, H, F]
    phi_k = features(k.double(), kernel)
    v = v.double()
    batch, length, heads, feat = phi_q.shape
    if state is None:
        kv = phi_q.new_zeros(batch, heads, feat, v.shape[-1])
        k_sum = phi_q.new_zeros(batch, heads, feat)
    else:
        kv, k_sum = state.kv.double(), state.k_sum.double()
    outputs = []
    for t in range(length):
        kv = kv + torch.einsum("bhf,bhv->bhfv", phi_k[:, t], v[:, t])
        k_sum = k_sum + phi_k[:, t]
        numerator = torch.einsum("bhf,bhfv->bhv", phi_q[:, t], kv)
        if normalize:
            denominator = torch.einsum("bhf,bhf->bh", phi_q[:, t], k_sum)
            numerator = numerator / (denominator.unsqueeze(-1) + eps)
        outputs.append(numerator)
    o = torch.stack(outputs, dim=1)
    return o, (LinearAttentionState(kv, k_sum) if output_final_state else None)
