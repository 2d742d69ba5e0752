"""Triton backend: fused GPU kernels for the polynomial kernels (ReBased, Based, the square ablations).

Imported only on backend="triton" or "auto" (rebased.ops never imports it at load time). Importing it
registers its (mode, backend) pairs into rebased.ops.IMPLEMENTATIONS. Under TRITON_INTERPRET=1 the same
kernels run on CPU tensors (fixed launch configs), which is how CI checks their logic.

    chunk     linear in T; forward and backward; initial and final state      ("chunk", "triton")
              (chunk_dispatch.py: the fused kernels for small, plentiful heads, else chunk-states)
    parallel  tiled quadratic; forward and backward; final state, no initial    ("parallel", "triton")
    step_     one decoding token, the state updated in place                  rebased.ops.triton.step_
                                                                              (linear_attention_step(backend="triton"))

Modules: chunk_states.py (per-chunk state sums, a scan over the chunk states, then output and gradient
kernels on the parallel kernel's tiles), fused_chunk.py (one program per (sequence, head) walks its chunks with
the state in registers: small heads in numbers, as in the MQAR models), chunk_dispatch.py (which of the two a
chunk call runs, and where mode="auto" prefers it to parallel), parallel.py, step.py (the decode step),
layer_norm.py (LayerNorm + affine + cast in one pass, through rebased.ops.norm), cross_entropy.py (a chunk of
logits' loss and softmax-minus-onehot gradient in one pass, for rebased.ops.cross_entropy); the jit tiles they share
(tiles.py); what they take and refuse (inputs.py); the per-program tables over dense or packed sequences
(sequences.py); how they are launched (launch.py: interpreter or compiled, dot precision, the step down to a
launch that fits); the Triton versions they are trusted on (versions.py).

Covered: polynomial kernels (any c0, c1, c2, scale); chunk and parallel: q/k and v dims <= 128 with any
polynomial (the fused chunk kernels: q/k <= 32, v <= 64, chosen at q/k and v <= 16); step_: q/k dim <= 32 when
there is a quadratic term (<= 128 without one); any T, any batch;
float32, bfloat16, float16. Anything else raises NotImplementedError before doing work, and backend="auto"
then runs torch. Variable-length batches (cu_seqlens): both the chunk and the parallel kernels walk the
offsets themselves (one launch per kernel for all sequences; a dense batch is the same kernels on B
sequences of T). The ReBased LayerNorm and affine run as one fused pass of their own: the official norm
spans all heads, so it cannot sit in a per-head program's loads. Measurements and what bounds them:
benchmarks/results/h200/README.md.
"""

from __future__ import annotations

import triton  # noqa: F401  (ImportError here tells the dispatcher the backend is unavailable)

from rebased.ops import IMPLEMENTATIONS, VARLEN_IMPLEMENTATIONS
from rebased.ops.triton.chunk_dispatch import chunk_linear_attention, packed_chunk_linear_attention
from rebased.ops.triton.chunk_states import chunk_states_linear_attention
from rebased.ops.triton.fused_chunk import fused_chunk_linear_attention
from rebased.ops.triton.parallel import packed_parallel_linear_attention, parallel_linear_attention
from rebased.ops.triton.step import step_

IMPLEMENTATIONS[("chunk", "triton")] = chunk_linear_attention
IMPLEMENTATIONS[("parallel", "triton")] = parallel_linear_attention
VARLEN_IMPLEMENTATIONS[("chunk", "triton")] = packed_chunk_linear_attention
VARLEN_IMPLEMENTATIONS[("parallel", "triton")] = packed_parallel_linear_attention

__all__ = ["chunk_states_linear_attention", "fused_chunk_linear_attention", "parallel_linear_attention", "step_"]
