"""Numerics by construction: bf16 inputs keep fp32 normalisers, long sequences and huge inputs stay finite."""

import pytest
import torch

from rebased.feature_maps import make_feature_map
from rebased.ops import MODES, Polynomial, linear_attention, linear_attention_reference, linear_attention_step
from rebased.testing import per_position_relative_error


@pytest.fixture(scope="module")
def bf16_case():
    """bf16 q, k (ReBased-prepared), v, an output gradient, and the float64 reference's gradients on the same
    bf16 numbers: the reference (a float64 loop over time) runs once for the three modes."""
    generator = torch.Generator().manual_seed(0)
    batch, length, heads, dim = 2, 160, 2, 16
    fmap = make_feature_map("rebased", dim, heads)
    q, k, v = (torch.randn(batch, length, heads, dim, generator=generator) for _ in range(3))
    with torch.no_grad():
        q, k = fmap.prepare(q, k)
    low = [x.bfloat16() for x in (q, k, v)]
    exact = [x.double().requires_grad_() for x in low]  # the same bf16 numbers, in float64
    grad_o = torch.randn(batch, length, heads, dim, generator=generator).bfloat16()
    ref, _ = linear_attention_reference(*exact, kernel=fmap.kernel)
    ref_grads = torch.autograd.grad((ref * grad_o.double()).sum(), exact)
    return low, grad_o, ref_grads, fmap.kernel


@pytest.mark.parametrize("mode", MODES)
def test_bf16_gradients_within_one_percent_at_every_position(mode, bf16_case):
    """ReBased's normaliser is tiny near the start; in bf16 it would throw the first gradients off."""
    inputs, grad_o, ref_grads, kernel = bf16_case
    low = [x.clone().requires_grad_() for x in inputs]
    o, _ = linear_attention(*low, mode=mode, kernel=kernel, chunk_size=32)
    assert o.dtype == torch.bfloat16
    grads = torch.autograd.grad((o * grad_o).sum(), low)
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        assert grad.dtype == torch.bfloat16
        assert per_position_relative_error(grad, ref_grad).max() < 0.01, f"d{name}"


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_long_sequence_stays_finite(mode):
    """16384 tokens. The recurrent form (a Python loop, one token a step) takes the last 256 from the state
    the chunk form leaves after the first 16128, as decoding after a long prefill does: its steps add to a
    state of a 16k-token magnitude, without 16k steps of Python."""
    generator = torch.Generator().manual_seed(1)
    length, tail = 16384, 256
    for name in ("rebased", "taylor"):
        fmap = make_feature_map(name, 4, 1)
        q, k, v = (torch.randn(1, length, 1, 4, generator=generator) for _ in range(3))
        leaves = [x.requires_grad_() for x in (q, k, v)]
        q2, k2 = fmap.prepare(q, k)
        options = dict(kernel=fmap.kernel, output_final_state=True)
        if mode == "chunk":
            o, state = linear_attention(q2, k2, v, mode="chunk", **options)
        else:
            cut = length - tail
            head, prefix = linear_attention(q2[:, :cut], k2[:, :cut], v[:, :cut], mode="chunk", **options)
            last, state = linear_attention(
                q2[:, cut:], k2[:, cut:], v[:, cut:], mode="recurrent", initial_state=prefix, **options
            )
            o = torch.cat([head, last], dim=1)
        o.sum().backward()
        assert torch.isfinite(o).all() and torch.isfinite(state.kv).all() and torch.isfinite(state.k_sum).all()
        assert all(torch.isfinite(x.grad).all() for x in leaves), name
        # A normalised output is a weighted mean of the values when similarities are >= 0.
        assert o.abs().max() <= v.abs().max() + 1e-4


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scale", [1e2, 1e4])
def test_huge_inputs_stay_finite(mode, scale):
    generator = torch.Generator().manual_seed(2)
    for name in ("rebased", "square", "taylor"):
        fmap = make_feature_map(name, 8, 2)
        q, k = (scale * torch.randn(2, 40, 2, 8, generator=generator) for _ in range(2))
        v = torch.randn(2, 40, 2, 8, generator=generator)
        leaves = [x.requires_grad_() for x in (q, k, v)]
        q2, k2 = fmap.prepare(q, k)
        o, _ = linear_attention(q2, k2, v, mode=mode, kernel=fmap.kernel, chunk_size=16)
        o.sum().backward()
        assert torch.isfinite(o).all(), name
        assert all(torch.isfinite(x.grad).all() for x in leaves), name


@pytest.mark.parametrize("mode", MODES)
def test_zero_denominator_gives_zero_not_nan(mode):
    """ReBased's similarity is 0 for orthogonal q, k: the normaliser is exactly 0 and eps must carry it."""
    dim = 4
    q = torch.zeros(1, 3, 1, dim)
    k = torch.zeros(1, 3, 1, dim)
    q[..., 0], k[..., 1] = 1.0, 1.0  # q . k = 0 everywhere
    v = torch.randn(1, 3, 1, 2)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    o, _ = linear_attention(q, k, v, mode=mode, kernel=Polynomial.rebased(dim))
    o.sum().backward()
    assert torch.equal(o, torch.zeros_like(o))
    assert all(torch.isfinite(x.grad).all() for x in leaves)


def test_step_state_stays_fp32_for_bf16_inputs():
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 4, generator=generator).bfloat16() for _ in range(3))
    o, state = linear_attention_step(q, k, v, kernel=Polynomial.rebased(4))
    assert o.dtype == torch.bfloat16 and state.kv.dtype == torch.float32 and state.k_sum.dtype == torch.float32
