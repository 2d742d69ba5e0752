"""Variable-length batches: N sequences packed along T ([1, T_total, H, *]), bounded by cu_seqlens.

Sequence i is rows cu_seqlens[i] : cu_seqlens[i + 1]; states have one row per sequence ([N, H, F, V],
[N, H, F]); a zero-length sequence passes its initial state (or zeros) through. A (mode, backend) pair in
rebased.ops.VARLEN_IMPLEMENTATIONS walks the offsets itself (the Triton chunk and parallel kernels: one launch
for all sequences); every other pair runs here, one call of linear_attention per sequence, which costs a launch
each: fine for a few long documents, slow for many short ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rebased.ops.common import LinearAttentionState, compute_dtype, feature_dim, validate_inputs, validate_state


def sequence_bounds(cu_seqlens: object, q: Tensor) -> list[int]:
    """cu_seqlens as a list of N + 1 offsets, or ValueError naming what is wrong."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor of N + 1 offsets, got {cu_seqlens!r}")
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens, q, k, v hold the sequences packed along T: B must be 1, got {q.shape[0]}")
    bounds = [int(x) for x in cu_seqlens.tolist()]
    total = q.shape[1]
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(f"cu_seqlens must run from 0 to T = {total} with at least one sequence, got {bounds}")
    if any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
    return bounds


def validate_packed(q, k, v, cu_seqlens, initial_state, kernel, eps) -> tuple[list[int], LinearAttentionState | None]:
    """The offsets as a list and the initial state (N rows) of a packed call, or ValueError."""
    bounds = sequence_bounds(cu_seqlens, q)
    validate_inputs(q, k, v, None, kernel, eps)
    count, heads, feat, value_dim = len(bounds) - 1, q.shape[2], feature_dim(q.shape[-1], kernel), v.shape[-1]
    state = None if initial_state is None else validate_state(initial_state, count, heads, feat, value_dim)
    return bounds, state


def varlen_linear_attention(
    attention: Callable,  # linear_attention itself, called once per sequence
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bounds: list[int],  # the offsets and N-row state as validate_packed returns them
    state: LinearAttentionState | None,
    *,
    kernel,
    output_final_state: bool,
    eps: float,
    **options,
) -> tuple[Tensor, LinearAttentionState | None]:
    heads, feat, value_dim = q.shape[2], feature_dim(q.shape[-1], kernel), v.shape[-1]
    outputs, finals = [], []
    for i, (start, end) in enumerate(zip(bounds, bounds[1:])):
        first = None if state is None else LinearAttentionState(state.kv[i : i + 1], state.k_sum[i : i + 1])
        if end == start:  # nothing to attend to: the state passes through
            outputs.append(v[:, start:end])
            finals.append(first if first is not None else _zeros(q, heads, feat, value_dim))
            continue
        o, final = attention(
            q[:, start:end], k[:, start:end], v[:, start:end], kernel=kernel, initial_state=first,
            output_final_state=output_final_state, eps=eps, **options,
        )  # fmt: skip
        outputs.append(o)
        finals.append(final)
    o = torch.cat(outputs, dim=1)
    if not output_final_state:
        return o, None
    dtype = compute_dtype(q.dtype)
    kv = torch.cat([f.kv.to(dtype) for f in finals])
    return o, LinearAttentionState(kv, torch.cat([f.k_sum.to(dtype) for f in finals]))


def _zeros(q: Tensor, heads: int, feat: int, value_dim: int) -> LinearAttentionState:
    dtype = compute_dtype(q.dtype)
    kv = torch.zeros(1, heads, feat, value_dim, dtype=dtype, device=q.device)
    return LinearAttentionState(kv, torch.zeros(1, heads, feat, dtype=dtype, device=q.device))
