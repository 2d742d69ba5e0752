"""The decode step: one token, the feature-space state updated in place (inference only, no autograd).

    S += phi(k) v^T,   z += phi(k),   o = phi(q) S / (phi(q) z + eps),   phi(x) = [a0, a1 x, a2 vec(x (x) x)]

One program owns one (batch, head): it updates z first (the normaliser needs the new z for every V
block), then walks the V blocks, each read once and written once. The step reads and writes the whole
state, so its floor is the state's bytes (B H F V 4 bytes, twice) over memory bandwidth.

Shape letters: B batch, H heads, D q/k dim (BD padded), F feature dim, V value dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from rebased.ops.common import LinearAttentionState
from rebased.ops.kernels import Polynomial
from rebased.ops.triton.inputs import PolynomialArgs, check_dtype_and_device
from rebased.ops.triton.tiles import square_feature_rows


@triton.jit
def step_kernel(
    q, k, v, o, kv, k_sum, D, V, F, a0, a1, a2, eps,
    BD: tl.constexpr, BD2: tl.constexpr, BV: tl.constexpr,
    HAS0: tl.constexpr, HAS1: tl.constexpr, HAS2: tl.constexpr, NORMALIZE: tl.constexpr, CLAMP: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BD)
    qv = tl.load(q + bh * D + d, mask=d < D, other=0.0).to(tl.float32)
    kv_ = tl.load(k + bh * D + d, mask=d < D, other=0.0).to(tl.float32)
    row2, m2 = square_feature_rows(D, BD, BD2)
    off1 = 1 if HAS0 else 0
    off2 = off1 + (D if HAS1 else 0)
    z_base = k_sum + bh * F
    s_base = kv + bh * F * V

    den = tl.zeros([1], tl.float32)
    if HAS0:
        z0 = tl.load(z_base + tl.zeros([1], tl.int32)) + a0
        tl.store(z_base + tl.zeros([1], tl.int32), z0)
        den += a0 * z0
    if HAS1:
        z1 = tl.load(z_base + off1 + d, mask=d < D, other=0.0) + a1 * kv_
        tl.store(z_base + off1 + d, z1, mask=d < D)
        den += a1 * tl.sum(qv * z1, axis=0)
    if HAS2:
        pq = tl.reshape(qv[:, None] * qv[None, :], [BD2])
        pk = tl.reshape(kv_[:, None] * kv_[None, :], [BD2])
        z2 = tl.load(z_base + off2 + row2, mask=m2, other=0.0) + a2 * pk
        tl.store(z_base + off2 + row2, z2, mask=m2)
        den += a2 * tl.sum(pq * z2, axis=0)
    if CLAMP:
        den = tl.maximum(den, 0.0)

    for start in range(0, V, BV):
        cv = start + tl.arange(0, BV)
        mv = cv < V
        vv = tl.load(v + bh * V + cv, mask=mv, other=0.0).to(tl.float32)
        num = tl.zeros([BV], tl.float32)
        if HAS0:
            s0 = tl.load(s_base + cv, mask=mv, other=0.0) + a0 * vv
            tl.store(s_base + cv, s0, mask=mv)
            num += a0 * s0
        if HAS1:
            ptr1 = s_base + (off1 + d)[:, None] * V + cv[None, :]
            m1 = (d < D)[:, None] & mv[None, :]
            s1 = tl.load(ptr1, mask=m1, other=0.0) + a1 * kv_[:, None] * vv[None, :]
            tl.store(ptr1, s1, mask=m1)
            num += a1 * tl.sum(qv[:, None] * s1, axis=0)
        if HAS2:
            ptr2 = s_base + (off2 + row2)[:, None] * V + cv[None, :]
            mm = m2[:, None] & mv[None, :]
            s2 = tl.load(ptr2, mask=mm, other=0.0) + a2 * pk[:, None] * vv[None, :]
            tl.store(ptr2, s2, mask=mm)
            num += a2 * tl.sum(pq[:, None] * s2, axis=0)
        if NORMALIZE:
            num = num / (den + eps)
        tl.store(o + bh * V + cv, num.to(o.dtype.element_ty), mask=mv)


STEP_SQUARE_DIM_LIMIT = 32  # the step's q/k dim limit with a quadratic term (see _check_dims)


def _check_dims(q: Tensor, kernel: Polynomial | None, what: str) -> None:
    """The step's q/k dim limits: 128, or 32 with a quadratic term (a program holds the D^2 square features
    and a [D^2, BV] state tile; 32, 1024 features, is the largest it is tested at)."""
    if (kernel is None or kernel.c2 == 0) and q.shape[-1] > 128:
        raise NotImplementedError(f"{what} takes q, k without a quadratic term up to dim 128, got {q.shape[-1]}")
    if kernel is not None and kernel.c2 > 0 and q.shape[-1] > STEP_SQUARE_DIM_LIMIT:
        raise NotImplementedError(
            f"{what} supports quadratic kernels with q/k dim <= {STEP_SQUARE_DIM_LIMIT}, got {q.shape[-1]}"
        )


def _blocks(head_dim: int, poly: PolynomialArgs) -> tuple[int, int]:
    bd = max(16, triton.next_power_of_2(head_dim))
    return bd, (bd * bd if poly.c2 > 0 else 16)  # BD2 is unused without a quadratic term: keep it tiny


@torch.no_grad()
def step_(
    q: Tensor,  # [B, H, D]
    k: Tensor,  # [B, H, D]
    v: Tensor,  # [B, H, V]
    state: LinearAttentionState,  # fp32, contiguous; updated in place
    *,
    kernel: Polynomial | None = None,
    normalize: bool = True,
    eps: float = 1e-12,
) -> Tensor:
    """One decoding step: adds phi(k) v^T to the state in place, returns o (v's dtype)."""
    check_dtype_and_device("triton step", q)
    _check_dims(q, kernel, "triton step")
    kv, k_sum = state
    if kv.dtype != torch.float32 or k_sum.dtype != torch.float32 or not (kv.is_contiguous() and k_sum.is_contiguous()):
        raise ValueError("triton step updates the state in place: it must be contiguous float32")
    batch, heads, head_dim = q.shape
    value_dim = v.shape[-1]
    poly = PolynomialArgs.of(kernel)
    feat = kv.shape[2]
    bd, bd2 = _blocks(head_dim, poly)
    o = torch.empty_like(v)
    block_v = min(max(16, triton.next_power_of_2(value_dim)), max(16, 8192 // bd2))  # ~64 floats a thread
    step_kernel[(batch * heads,)](
        q.contiguous(), k.contiguous(), v.contiguous(), o, kv, k_sum, head_dim, value_dim, feat,
        **poly.feature_args(), eps=eps, BD=bd, BD2=bd2, BV=block_v, **poly.flags(), NORMALIZE=normalize,
        CLAMP=poly.clamp, num_warps=4,
    )  # fmt: skip
    return o
