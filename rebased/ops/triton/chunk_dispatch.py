"""The ("chunk", "triton") pair: the fused kernels where heads are small and plenty, the chunk-states kernels
elsewhere.

The fused kernels (fused_chunk.py) run one program per (sequence, head), each walking its whole sequence with the
state in registers; they win where that state is small (q/k dim <= 16, value dim <= 16: at most 16 x 256 fp32
floats, compiled without large spills) and there are enough (sequence, head) pairs to keep every SM busy. With
few pairs (one long sequence, say) most of the GPU would idle while each program walks; the chunk-states kernels
(chunk_states.py) spread one sequence's chunks over many programs instead. Both compute the same op to rounding
and take and give states in the same layout, so the choice is only about speed.

mode="auto" (rebased.ops.linear_attention) resolves to parallel up to PARALLEL_MAX_LENGTH["triton"], which was
measured against the chunk-states kernels; where the fused kernels take the call, the chunk form is chosen from
AUTO_CHUNK_FROM_LENGTH on instead (prefers_chunk_mode).

Measured on an H200 (benchmarks/fused_chunk_gpu.sh, benchmarks/results/h200_mqar/fused_chunk.md): at batch 512,
12 heads, q/k 16, the fused kernels take forward+backward 1.0-5x faster than parallel and chunk-states from L 512
(v 5 and 16), while parallel is ahead at L 256 (v 16) and chunk-states at batch 4, L 16k, v 5 (48 pairs): the
two thresholds below put each of those shapes on its fastest route.
"""

from __future__ import annotations

from torch import Tensor

from rebased.ops.common import LinearAttentionState
from rebased.ops.kernels import Polynomial
from rebased.ops.triton.chunk_states import chunk_states_linear_attention, packed_chunk_states_linear_attention
from rebased.ops.triton.fused_chunk import fused_chunk_linear_attention, packed_fused_chunk_linear_attention
from rebased.ops.triton.launch import sm_count

FUSED_MAX_HEAD_DIM = 16  # the fused kernels take wider heads too (fused_chunk.refuse), but spill there
FUSED_MAX_VALUE_DIM = 16
MIN_PROGRAMS_PER_SM = 4  # (sequence, head) pairs per SM from which the fused kernels are chosen
AUTO_CHUNK_FROM_LENGTH = 512  # mode="auto" takes the fused chunk kernels from this length


def prefers_fused_chunk(q: Tensor, v: Tensor, sequences: int) -> bool:
    """Whether the fused kernels take a chunk-mode call: small heads (FUSED_MAX_*), at least MIN_PROGRAMS_PER_SM
    (sequence, head) pairs for each SM of q's device."""
    small = q.shape[-1] <= FUSED_MAX_HEAD_DIM and v.shape[-1] <= FUSED_MAX_VALUE_DIM
    plenty = sequences * q.shape[2] >= MIN_PROGRAMS_PER_SM * sm_count(q.device)
    return small and plenty


def prefers_chunk_mode(q: Tensor, v: Tensor, sequences: int, length: int) -> bool:
    """mode="auto" on the fused backend: the chunk form, not the parallel one, where the fused kernels take the
    call and the sequences are at least AUTO_CHUNK_FROM_LENGTH long."""
    return length >= AUTO_CHUNK_FROM_LENGTH and prefers_fused_chunk(q, v, sequences)


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
    """The ("chunk", "triton") pair: fused_chunk where prefers_fused_chunk, else chunk_states."""
    run = fused_chunk_linear_attention if prefers_fused_chunk(q, v, q.shape[0]) else chunk_states_linear_attention
    return run(q, k, v, kernel=kernel, initial_state=initial_state, output_final_state=output_final_state,
               normalize=normalize, eps=eps, chunk_size=chunk_size)  # fmt: skip


def packed_chunk_linear_attention(
    q: Tensor,  # [1, T_total, H, D]
    k: Tensor,
    v: Tensor,  # [1, T_total, H, V]
    cu_seqlens: Tensor,  # [N + 1]
    *,
    kernel: Polynomial | None,
    initial_state: LinearAttentionState | None,
    output_final_state: bool,
    normalize: bool,
    eps: float,
    chunk_size: int,
) -> tuple[Tensor, LinearAttentionState | None]:
    """The packed ("chunk", "triton") pair: the same choice, counting the N packed sequences."""
    fused = prefers_fused_chunk(q, v, len(cu_seqlens) - 1)
    run = packed_fused_chunk_linear_attention if fused else packed_chunk_states_linear_attention
    return run(q, k, v, cu_seqlens, kernel=kernel, initial_state=initial_state, output_final_state=output_final_state,
               normalize=normalize, eps=eps, chunk_size=chunk_size)  # fmt: skip
