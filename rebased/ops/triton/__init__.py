"""Triton backend: fused GPU kernels for the polynomial kernels (ReBased, Based, the square ablations).

Imported only on backend="triton" or "auto" (rebased.ops never imports it at load time). Importing it
registers its (mode, backend) pairs into rebased.ops.IMPLEMENTATIONS. Under TRITON_INTERPRET=1 the same
kernels run on CPU tensors (fixed launch configs), which is how CI checks their logic.

    chunk   linear in T; forward and backward; initial and final state        ("chunk", "triton")
    step_   one decoding token, the state updated in place                      rebased.ops.triton.step_
"""

from __future__ import annotations

import triton  # noqa: F401  (ImportError here tells the dispatcher the backend is unavailable)

from rebased.ops import IMPLEMENTATIONS
from rebased.ops.triton.functions import chunk_linear_attention, step_

IMPLEMENTATIONS[("chunk", "triton")] = chunk_linear_attention

__all__ = ["chunk_linear_attention", "step_"]
