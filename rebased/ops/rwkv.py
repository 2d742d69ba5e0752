"""RWKV-4's WKV over [B, T, D]: torch (a chunked form, the reference), or a Triton kernel on CUDA.

    wkv_t = (sum_{s<t} e^{w (t-1-s) + k_s} v_s + e^{u + k_t} v_t) / (sum_{s<t} e^{w (t-1-s) + k_s} + e^{u + k_t})

per channel, with w < 0 the decay and u the bonus of the current token. wkv_t is a softmax-weighted average of v
over the exponents above, so every exponential is taken after subtracting a running max p: the state is
(a, b, p) with a = sum e^{w (t-s) + k_s - p} v_s and b likewise, and nothing overflows.

The torch form runs in chunks of Cs tokens: quadratic inside a chunk ([B, Cs, Cs, D] exponents), (a, b, p)
between. backend "torch" is that form, in the inputs' dtype (fp32, or fp64 for fp64 inputs); "triton" the kernels
(rebased/ops/triton/wkv.py: fp32; CUDA, or CPU tensors under TRITON_INTERPRET=1); "auto" the kernels for CUDA
tensors of at most 32 bits when WKV_TRITON_ON_GPU is set and triton is installed at a version the GPU tests
passed on, else torch. Explicit backends never fall back. Both start from the empty state; the final state they
return carries no gradient (generation continues from it with wkv_step).

Shape letters: B batch, T time, D channels, Cs chunk size.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

import torch
from torch import Tensor

_KERNEL_MODULE = "rebased.ops.triton.wkv"
# Whether "auto" may take the kernels on a GPU: off until their GPU tests (tests/test_triton_wkv.py -m gpu) have
# passed on the device and an RWKV MQAR step has timed them (benchmarks/mqar_cost_gpu.py --variants
# graph-committed,graph-committed-triton-wkv --cells rwkv:64:2048).
WKV_TRITON_ON_GPU = False
EMPTY = -1e38  # the running max before any token: exp(EMPTY - anything finite) = 0, without inf - inf


class WKVState(NamedTuple):
    a: Tensor  # [B, D]
    b: Tensor  # [B, D]
    p: Tensor  # [B, D]


def empty_state(batch: int, channels: int, like: Tensor) -> WKVState:
    """The state before any token, in like's dtype and device."""
    zeros = like.new_zeros(batch, channels)
    return WKVState(zeros, zeros, torch.full_like(zeros, EMPTY))


def wkv_chunk(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WKVState) -> tuple[Tensor, WKVState]:
    """k, v [B, Cs, D]; w, u [D] -> wkv [B, Cs, D] and the state after the chunk."""
    size = k.shape[1]
    t = torch.arange(size, device=k.device, dtype=k.dtype)
    gap = (t[:, None] - 1 - t[None, :]).unsqueeze(-1)  # [Cs(t), Cs(s), 1]: t - 1 - s
    exponents = gap * w + k.unsqueeze(1)  # [B, Cs(t), Cs(s), D]
    exponents = torch.where(gap >= 0, exponents, float("-inf"))
    diagonal = torch.eye(size, dtype=torch.bool, device=k.device).unsqueeze(-1)
    exponents = torch.where(diagonal, (u + k).unsqueeze(2), exponents)
    from_state = state.p.unsqueeze(1) + t[:, None] * w  # [B, Cs, D]: the prefix's weight at token t
    top = torch.maximum(from_state, exponents.amax(2)).detach()  # wkv does not depend on the shift
    weights, state_weight = (exponents - top.unsqueeze(2)).exp(), (from_state - top).exp()
    numerator = (weights * v.unsqueeze(1)).sum(2) + state_weight * state.a.unsqueeze(1)
    denominator = weights.sum(2) + state_weight * state.b.unsqueeze(1)
    to_end = (size - 1 - t)[:, None] * w + k  # [B, Cs, D]: each token's exponent after the chunk
    old = state.p + size * w
    p = torch.maximum(old, to_end.amax(1)).detach()
    scale, fresh = (old - p).exp(), (to_end - p.unsqueeze(1)).exp()
    new = WKVState(scale * state.a + (fresh * v).sum(1), scale * state.b + fresh.sum(1), p)
    return numerator / denominator, new


def wkv_step(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WKVState) -> tuple[Tensor, WKVState]:
    """One token, the standard stable recurrence: k, v [B, D]."""
    top = torch.maximum(state.p, u + k)
    e_old, e_new = (state.p - top).exp(), (u + k - top).exp()
    out = (e_old * state.a + e_new * v) / (e_old * state.b + e_new)
    decayed = state.p + w
    p = torch.maximum(decayed, k)
    e_old, e_new = (decayed - p).exp(), (k - p).exp()
    return out, WKVState(e_old * state.a + e_new * v, e_old * state.b + e_new, p)


def _torch_wkv(w: Tensor, u: Tensor, k: Tensor, v: Tensor, chunk: int) -> tuple[Tensor, WKVState]:
    state, outputs = empty_state(k.shape[0], k.shape[2], k), []
    for start in range(0, k.shape[1], chunk):
        part = slice(start, start + chunk)
        out, state = wkv_chunk(w, u, k[:, part], v[:, part], state)
        outputs.append(out)
    y = torch.cat(outputs, dim=1) if outputs else k.new_zeros(k.shape)
    return y, WKVState(*(part.detach() for part in state))


def wkv(w: Tensor, u: Tensor, k: Tensor, v: Tensor, *, chunk: int, backend: str = "auto") -> tuple[Tensor, WKVState]:
    """w (< 0), u [D] in the compute dtype (fp32, or fp64); k, v [B, T, D] in any float dtype (autocast's bf16
    projections), computed in w's dtype -> wkv [B, T, D] and the final state in that dtype, from the empty state.
    The kernels read k and v as they are; the torch form casts them. chunk: the torch form's Cs."""
    from rebased.ops import pick_backend  # (rebased.ops imports this module)

    explicit = backend == "triton"
    backend = pick_backend(backend, k, "wkv", enabled=WKV_TRITON_ON_GPU and w.dtype != torch.float64)
    if explicit and torch.float64 in (w.dtype, u.dtype, k.dtype, v.dtype):
        raise NotImplementedError("wkv(backend='triton') computes in fp32; got float64 inputs")
    if backend == "torch":
        return _torch_wkv(w, u, k.to(w.dtype), v.to(w.dtype), chunk)
    return importlib.import_module(_KERNEL_MODULE).wkv(w, u, k, v)
