"""Feature maps: each states its feature dimension and kernel, and agrees with it."""

import math

import pytest
import torch
from torch import nn

from rebased.feature_maps import FEATURE_MAPS, make_feature_map
from rebased.ops import linear_attention, linear_attention_reference
from rebased.testing import assert_close

D, H = 8, 3


def random_qk(generator, length=6, dim=D, heads=H):
    return (torch.randn(2, length, heads, dim, generator=generator, dtype=torch.float64) for _ in range(2))


@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
def test_features_have_the_stated_dimension_and_run_through_every_mode(name):
    generator = torch.Generator().manual_seed(0)
    fmap = make_feature_map(name, D, H).double()
    q, k = random_qk(generator)
    phi_q, phi_k = fmap(q, k)
    assert phi_q.shape == phi_k.shape == (2, 6, H, fmap.feature_dim)
    v = torch.randn(2, 6, H, 5, generator=generator, dtype=torch.float64)
    q2, k2 = fmap.prepare(q, k)
    options = dict(kernel=fmap.kernel, normalize=fmap.normalize, eps=fmap.eps)
    expected, _ = linear_attention_reference(q2, k2, v, **options)
    for mode in ("parallel", "chunk", "recurrent"):
        o, _ = linear_attention(q2, k2, v, mode=mode, chunk_size=4, **options)
        assert_close(o, expected, rel_rms=1e-10, name=f"{name} {mode}")


@pytest.mark.parametrize("name", [n for n in sorted(FEATURE_MAPS) if make_feature_map(n, D, H).kernel is not None])
def test_polynomial_maps_agree_with_their_kernel(name):
    """phi(q') . phi(k') == kernel.similarity(q' . k') for every pair."""
    generator = torch.Generator().manual_seed(1)
    fmap = make_feature_map(name, D, H).double()
    q, k = random_qk(generator)
    phi_q, phi_k = fmap(q, k)
    q2, k2 = fmap.prepare(q, k)
    by_features = torch.einsum("bthf,bshf->bhts", phi_q, phi_k)
    by_kernel = fmap.kernel.similarity(torch.einsum("bthd,bshd->bhts", q2, k2))
    assert_close(by_features, by_kernel, rel_rms=1e-12, name=name)


def test_kernel_formulas_match_the_paper():
    s = torch.linspace(-3, 3, 13, dtype=torch.float64)
    rebased = make_feature_map("rebased", 16).kernel
    taylor = make_feature_map("taylor", 16).kernel
    assert_close(rebased.similarity(s), (s / 4) ** 2, rel_rms=1e-15)
    assert_close(taylor.similarity(s), 1 + s / 4 + s**2 / 32, rel_rms=1e-15)
    assert make_feature_map("taylor", 16).feature_dim == 273 and make_feature_map("rebased", 16).feature_dim == 256
    assert taylor.non_negative and taylor.similarity(torch.tensor(-4.0)).item() == pytest.approx(0.5)
    assert not make_feature_map("identity", 16).kernel.non_negative


def test_rebased_official_scope_is_two_joint_layernorms():
    """Official code: nn.LayerNorm(H * D) for q and another for k; 768 parameters at 12 heads of 16."""
    fmap = make_feature_map("rebased", 16, 12)
    assert sum(p.numel() for p in fmap.parameters()) == 768
    generator = torch.Generator().manual_seed(2)
    q, k = (torch.randn(2, 5, 12, 16, generator=generator) for _ in range(2))
    with torch.no_grad():
        for p in fmap.parameters():
            p.normal_(generator=generator)
    norm_q, norm_k = nn.LayerNorm(192), nn.LayerNorm(192)
    norm_q.load_state_dict(fmap.q_norm.state_dict())
    norm_k.load_state_dict(fmap.k_norm.state_dict())
    q2, k2 = fmap.prepare(q, k)
    assert_close(q2, norm_q(q.flatten(-2)).unflatten(-1, (12, 16)), rel_rms=1e-6)
    assert_close(k2, norm_k(k.flatten(-2)).unflatten(-1, (12, 16)), rel_rms=1e-6)


def test_rebased_per_head_scope_shares_gamma_beta_across_heads_and_qk():
    fmap = make_feature_map("rebased", 16, 12, scope="per_head")
    assert sum(p.numel() for p in fmap.parameters()) == 32
    q = torch.randn(1, 3, 12, 16)
    q2, k2 = fmap.prepare(q, q.clone())
    assert_close(q2, nn.functional.layer_norm(q, (16,)), rel_rms=1e-6)
    assert torch.equal(q2, k2)


def test_ablation_parameters():
    counts = {n: sum(p.numel() for p in make_feature_map(n, 16, 12).parameters()) for n in FEATURE_MAPS}
    assert counts["square"] == counts["norm_square"] == counts["taylor"] == 0
    assert counts["gamma_square"] == 2 * 192 and counts["affine_square"] == 4 * 192


def test_performer_estimates_the_softmax_kernel():
    """E[phi(q).phi(k)] = exp(q.k / sqrt(D)); with many features the estimate is close."""
    generator = torch.Generator().manual_seed(3)
    fmap = make_feature_map("performer", 4, 1, num_features=16384, generator=generator).double()
    q, k = (0.5 * torch.randn(1, 8, 1, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    phi_q, phi_k = fmap(q, k)
    estimate = torch.einsum("bthf,bshf->bts", phi_q, phi_k)
    exact = torch.einsum("bthd,bshd->bts", q, k).div(2).exp()
    assert_close(estimate, exact, rel_rms=0.05, name="performer")
    assert (phi_q > 0).all()


def test_performer_is_reproducible_from_its_generator():
    a = make_feature_map("performer", 8, 1, generator=torch.Generator().manual_seed(7))
    b = make_feature_map("performer", 8, 1, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.projection, b.projection) and "projection" in a.state_dict()


def test_performer_cannot_overflow():
    fmap = make_feature_map("performer", 8, 1, generator=torch.Generator().manual_seed(0))
    phi_q, _ = fmap(1e4 * torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8))
    assert torch.isfinite(phi_q).all()


def test_cosformer_reweights_by_distance_and_continues_at_an_offset():
    fmap = make_feature_map("cosformer", D, 1, max_len=64).double()
    generator = torch.Generator().manual_seed(4)
    q, k = random_qk(generator, length=10, heads=1)
    phi_q, phi_k = fmap(q, k)
    scores = torch.einsum("btf,bsf->bts", phi_q[:, :, 0], phi_k[:, :, 0])
    t = torch.arange(10, dtype=torch.float64)
    expected = torch.einsum("btd,bsd->bts", q[:, :, 0].relu(), k[:, :, 0].relu())
    expected = expected * torch.cos(math.pi * (t[:, None] - t[None, :]) / (2 * 64))
    assert_close(scores, expected, rel_rms=1e-12)
    tail_q, _ = fmap(q[:, 4:], k[:, 4:], offset=4)  # decoding continues the positions
    assert_close(tail_q, phi_q[:, 4:], rel_rms=1e-15)


def test_hedgehog_features_are_positive_and_learnable():
    fmap = make_feature_map("hedgehog", D, H)
    q, k = random_qk(torch.Generator().manual_seed(5))
    phi_q, phi_k = fmap(q.float(), k.float())
    assert (phi_q > 0).all() and torch.allclose(phi_q.sum(-1), torch.full_like(phi_q[..., 0], 2.0))
    (phi_q * torch.randn_like(phi_q)).sum().backward()  # a plain sum is constant: softmax sums to 1
    assert fmap.q_weight.grad is not None and fmap.q_weight.grad.abs().sum() > 0


def test_gamma_and_beta_get_gradients_through_every_mode():
    generator = torch.Generator().manual_seed(6)
    fmap = make_feature_map("rebased", D, H).double()
    q, k = random_qk(generator, length=20)
    v = torch.randn(2, 20, H, 4, generator=generator, dtype=torch.float64)
    q2, k2 = fmap.prepare(q, k)
    ref, _ = linear_attention_reference(q2, k2, v, kernel=fmap.kernel)
    expected = torch.autograd.grad(ref.square().sum(), list(fmap.parameters()))
    for mode in ("parallel", "chunk", "recurrent"):
        q2, k2 = fmap.prepare(q, k)
        o, _ = linear_attention(q2, k2, v, mode=mode, kernel=fmap.kernel, chunk_size=8)
        grads = torch.autograd.grad(o.square().sum(), list(fmap.parameters()))
        for grad, ref_grad in zip(grads, expected):
            assert_close(grad, ref_grad, rel_rms=1e-10, name=f"gamma/beta grad, {mode}")


def test_unknown_names_and_options_fail_clearly():
    with pytest.raises(ValueError, match="did you mean 'rebased'"):
        make_feature_map("rebase", 16)
    with pytest.raises(ValueError, match="does not accept options"):
        make_feature_map("taylor", 16, window=3)
    with pytest.raises(ValueError, match="scope"):
        make_feature_map("rebased", 16, scope="global")
