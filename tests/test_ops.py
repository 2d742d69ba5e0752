"""Every torch (mode) of linear_attention against the float64 reference: outputs, states, gradients."""

import pytest
import torch

from rebased.ops import MODES, LinearAttentionState, Polynomial, linear_attention, linear_attention_reference
from rebased.testing import assert_close

B, H, D, V = 2, 2, 4, 3
LENGTHS = (1, 63, 64, 65, 200)
KERNELS = {
    "rebased": Polynomial.rebased(D),
    "taylor": Polynomial.taylor(D),
    "linear": Polynomial.linear(),
    "features": None,  # q, k arrive already feature-mapped (positive features)
}


def make_inputs(length, kernel, generator, dtype=torch.float64, batch=B):
    q, k = (torch.randn(batch, length, H, D, generator=generator, dtype=dtype) for _ in range(2))
    if kernel is None:
        q, k = q.exp(), k.exp()
    v = torch.randn(batch, length, H, V, generator=generator, dtype=dtype)
    return q, k, v


def prefix_state(kernel, generator, dtype=torch.float64, batch=B):
    """A state that a real prefix leaves, so that z = sum phi(k) agrees with kv."""
    q, k, v = make_inputs(9, kernel, generator, dtype, batch)
    _, state = linear_attention_reference(q, k, v, kernel=kernel, output_final_state=True)
    return LinearAttentionState(state.kv.to(dtype), state.k_sum.to(dtype))


def normalize_for(kernel):
    return kernel is None or kernel.non_negative


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kernel_name", KERNELS)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("with_state", [False, True], ids=["no_state", "state"])
def test_mode_matches_reference(mode, kernel_name, length, with_state):
    kernel = KERNELS[kernel_name]
    generator = torch.Generator().manual_seed(length * 7 + with_state)
    q, k, v = make_inputs(length, kernel, generator, torch.float32)
    state = prefix_state(kernel, generator, torch.float32) if with_state else None
    leaves = [q, k, v] + (list(state) if state else [])
    for x in leaves:
        x.requires_grad_(True)
    options = dict(kernel=kernel, initial_state=state, output_final_state=True, normalize=normalize_for(kernel))

    o, final = linear_attention(q, k, v, mode=mode, backend="torch", chunk_size=16, **options)
    ref_o, ref_final = linear_attention_reference(q, k, v, **options)
    assert o.dtype == torch.float32 and final.kv.dtype == torch.float32
    assert_close(o, ref_o, rel_rms=1e-5, name="o")
    assert_close(final.kv, ref_final.kv, rel_rms=1e-5, name="final kv")
    assert_close(final.k_sum, ref_final.k_sum, rel_rms=1e-5, name="final k_sum")

    grad_o = torch.randn(o.shape, generator=generator)
    grads = torch.autograd.grad((o * grad_o).sum() + final.kv.sum() + final.k_sum.sum(), leaves)
    ref_grads = torch.autograd.grad((ref_o * grad_o).sum() + ref_final.kv.sum() + ref_final.k_sum.sum(), leaves)
    names = ["dq", "dk", "dv", "d initial kv", "d initial k_sum"]
    for name, grad, ref in zip(names, grads, ref_grads):
        # atol: at T = 1 the exact dq, dk vanish (o_0 = v_0) and fp32 leaves cancellation noise ~1e-6.
        assert_close(grad, ref, rel_rms=1e-4, atol=1e-4, name=name)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64(mode):
    generator = torch.Generator().manual_seed(1)
    kernel = Polynomial.taylor(D)
    q, k, v = make_inputs(5, kernel, generator, batch=1)
    state = prefix_state(kernel, generator, batch=1)
    inputs = [x.requires_grad_(True) for x in (q, k, v, *state)]

    def run(q, k, v, kv, k_sum):
        o, final = linear_attention(
            q, k, v, mode=mode, backend="torch", kernel=kernel, chunk_size=2,
            initial_state=(kv, k_sum), output_final_state=True,
        )  # fmt: skip
        return o, final.kv, final.k_sum

    assert torch.autograd.gradcheck(run, inputs)


@pytest.mark.parametrize("first_mode", MODES)
@pytest.mark.parametrize("second_mode", MODES)
def test_state_carry_across_cuts_and_modes(first_mode, second_mode):
    """Cutting the sequence anywhere and carrying the state gives the output of one call."""
    kernel = Polynomial.rebased(D)
    generator = torch.Generator().manual_seed(2)
    q, k, v = make_inputs(70, kernel, generator, torch.float32)
    whole, whole_state = linear_attention(q, k, v, mode="parallel", kernel=kernel, output_final_state=True)
    for cut in (1, 17, 64, 69):
        head, state = linear_attention(
            q[:, :cut], k[:, :cut], v[:, :cut], mode=first_mode, kernel=kernel, chunk_size=16, output_final_state=True
        )
        tail, final = linear_attention(
            q[:, cut:], k[:, cut:], v[:, cut:], mode=second_mode, kernel=kernel, chunk_size=16,
            initial_state=state, output_final_state=True,
        )  # fmt: skip
        assert_close(torch.cat([head, tail], 1), whole, rel_rms=1e-5, name=f"o, cut at {cut}")
        assert_close(final.kv, whole_state.kv, rel_rms=1e-5, name=f"state, cut at {cut}")


@pytest.mark.parametrize("mode", MODES)
def test_kernel_trick_equals_explicit_features(mode):
    """The kernel-trick path on projected q, k equals linear attention on the expanded features (chunks of 8
    at T = 33, so that the chunk form's inter-chunk state term takes part)."""
    generator = torch.Generator().manual_seed(3)
    for kernel in (Polynomial.rebased(D), Polynomial.taylor(D)):
        q, k, v = make_inputs(33, kernel, generator)
        trick, trick_state = linear_attention(q, k, v, mode=mode, kernel=kernel, output_final_state=True, chunk_size=8)
        explicit, explicit_state = linear_attention(
            kernel.features(q), kernel.features(k), v, mode=mode, output_final_state=True, chunk_size=8
        )
        assert_close(trick, explicit, rel_rms=1e-10, name="o")
        assert_close(trick_state.kv, explicit_state.kv, rel_rms=1e-10, name="kv")


@pytest.mark.parametrize("mode", MODES)
def test_unnormalised_output_is_the_plain_sum(mode):
    generator = torch.Generator().manual_seed(4)
    kernel = Polynomial.linear()
    q, k, v = make_inputs(20, kernel, generator)
    o, _ = linear_attention(q, k, v, mode=mode, kernel=kernel, normalize=False, chunk_size=8)
    scores = torch.einsum("bthd,bshd->bhts", q, k).tril()
    expected = torch.einsum("bhts,bshv->bthv", scores, v)
    assert_close(o, expected, rel_rms=1e-12, name="o")


def test_chunk_size_does_not_change_the_result():
    generator = torch.Generator().manual_seed(5)
    kernel = Polynomial.taylor(D)
    q, k, v = make_inputs(50, kernel, generator)
    results = [linear_attention(q, k, v, mode="chunk", kernel=kernel, chunk_size=c)[0] for c in (1, 7, 16, 64, 128)]
    for result in results[1:]:
        assert_close(result, results[0], rel_rms=1e-12, name="chunked o")
