"""The fused chunk kernels (rebased/ops/triton/fused_chunk.py) against the float64 reference, and the choice
between them and the chunk-states kernels (chunk_dispatch.py).

Without CUDA the kernels run on CPU tensors under TRITON_INTERPRET=1 (set by tests/conftest.py), in
chunks of 16: tiny shapes, one (sequence, head) pair a program, so each case lists what it adds rather than
crossing every option. Tests marked gpu run the compiled kernels at the MQAR models' shapes.
"""

import pytest
import torch
from triton_setup import device_or_skip

HAS_CUDA = torch.cuda.is_available()

DEVICE = device_or_skip()

import rebased.ops as ops  # noqa: E402
import rebased.ops.triton.chunk_dispatch as dispatch  # noqa: E402
import rebased.ops.triton.fused_chunk as fused  # noqa: E402
from rebased.ops import (  # noqa: E402
    IMPLEMENTATIONS,
    VARLEN_IMPLEMENTATIONS,
    LinearAttentionState,
    Polynomial,
    linear_attention,
    linear_attention_reference,
)
from rebased.ops.triton.inputs import PolynomialArgs  # noqa: E402
from rebased.testing import assert_close, error_report, per_position_relative_error  # noqa: E402

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

KERNELS = {
    "rebased": Polynomial.rebased,  # the square alone: ReBased and the square ablations
    "based": Polynomial.taylor,  # 1 + s + s^2 / 2: every term
    "linear": lambda d: Polynomial.linear(),  # the linear term alone (no square state)
    "const_square": lambda d: Polynomial(c0=0.3, c2=1.0, scale=d**-0.5),  # constant and square, no linear
}
GRAD_NAMES = ("dq", "dk", "dv", "d kv0", "d k_sum0")


def make_inputs(shape, value_dim, generator, dtype):
    q, k = (torch.randn(*shape, generator=generator) for _ in range(2))
    v = torch.randn(*shape[:-1], value_dim, generator=generator)
    return [x.to(DEVICE, dtype) for x in (q, k, v)]


def prefix_state(batch, heads, head_dim, value_dim, kernel, generator):
    """The state a real prefix of 9 tokens leaves, plus noise that makes its square part asymmetric: the contract
    allows any state, and queries only see the symmetric part (fused_chunk's docstring)."""
    q, k, v = make_inputs((batch, 9, heads, head_dim), value_dim, generator, torch.float64)
    _, state = linear_attention_reference(q, k, v, kernel=kernel, output_final_state=True)
    noise = 0.01 * torch.randn(state.kv.shape, generator=generator, dtype=torch.float64).to(DEVICE)
    return LinearAttentionState((state.kv + noise).float(), state.k_sum.float())


def run_both(q, k, v, state, kernel, generator, normalize=None):
    """Output, final state and the gradients of a loss weighting all of them: the fused kernels and the reference.
    normalize: by default where the kernel is non-negative (the linear kernel's normaliser can cross 0)."""
    normalize = kernel.non_negative if normalize is None else normalize
    run = fused.fused_chunk_linear_attention
    leaves = [q, k, v] + (list(state) if state is not None else [])
    for x in leaves:
        x.requires_grad_(True)
    options = dict(kernel=kernel, initial_state=state, output_final_state=True, normalize=normalize, eps=1e-12)
    o, final = run(q, k, v, chunk_size=64, **options)
    assert o.dtype == v.dtype and final.kv.dtype == final.k_sum.dtype == torch.float32
    ref_o, ref_final = linear_attention_reference(q, k, v, **options)
    weights = [torch.randn(x.shape, generator=generator).to(DEVICE) for x in (o, final.kv, final.k_sum)]

    def loss(o, final):
        return sum((x.double() * w).sum() for x, w in zip((o, final.kv, final.k_sum), weights))

    grads = torch.autograd.grad(loss(o, final), leaves)
    ref_grads = torch.autograd.grad(loss(ref_o, ref_final), leaves)
    return (o, final, grads), (ref_o, ref_final, ref_grads)


def check(got, want, rel_rms):
    (o, final, grads), (ref_o, ref_final, ref_grads) = got, want
    assert_close(o, ref_o, rel_rms=rel_rms, name="o")
    assert_close(final.kv, ref_final.kv, rel_rms=rel_rms, name="final kv")
    assert_close(final.k_sum, ref_final.k_sum, rel_rms=rel_rms, name="final k_sum")
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        # atol: at T = 1 without a state o = v, so dq is 0 up to rounding and a relative error means nothing
        assert_close(g, r, rel_rms=rel_rms, atol=rel_rms / 10, name=name)


# (kernel, batch, length, heads, q/k dim, value dim, initial state). Chunks of 16 under the interpreter: lengths
# 1, chunk - 1, chunk, chunk + 1 and three chunks; value dims 1, 2 and 4 (the kernel ablation's), 5 and 8 (one
# state block of 8 columns per j), 16 and 42 (BV 64); q/k 16 (the MQAR models'), 4 and 12 (padded to 16), 32
# (BD 32); several heads and two sequences (each program finds its own rows and state row).
CASES = [
    ("rebased", 1, 1, 1, 16, 5, False),
    ("rebased", 1, 15, 2, 16, 8, True),
    ("rebased", 2, 17, 3, 16, 5, True),
    ("rebased", 1, 33, 1, 32, 16, False),
    ("based", 1, 16, 2, 16, 5, True),
    ("based", 1, 40, 1, 12, 42, True),
    ("based", 1, 17, 1, 4, 16, False),
    ("linear", 1, 20, 2, 12, 5, True),
    ("const_square", 1, 33, 1, 16, 8, True),
    # the kernel ablation's models: 12 heads of q/k 16 and v 1, 2, 2, 4 at d_model 16, 24, 32, 48
    ("rebased", 2, 19, 12, 16, 1, False),
    ("rebased", 1, 17, 3, 16, 2, True),
    ("based", 1, 33, 2, 16, 4, True),
]


@pytest.mark.parametrize(("name", "batch", "length", "heads", "head_dim", "value_dim", "with_state"), CASES,
                         ids=["-".join(map(str, case)) for case in CASES])  # fmt: skip
def test_fp32_matches_reference(name, batch, length, heads, head_dim, value_dim, with_state):
    generator = torch.Generator().manual_seed(length * 7 + value_dim)
    kernel = KERNELS[name](head_dim)
    q, k, v = make_inputs((batch, length, heads, head_dim), value_dim, generator, torch.float32)
    state = prefix_state(batch, heads, head_dim, value_dim, kernel, generator) if with_state else None
    check(*run_both(q, k, v, state, kernel, generator), rel_rms=1e-5)


@pytest.mark.parametrize(("name", "value_dim"), [("rebased", 5), ("based", 16)])
def test_fp16_matches_reference(name, value_dim):
    """16-bit inputs: o in their dtype (the backward reads an fp32 copy), states fp32, everything within 1% of
    float64 (fp16: the interpreter's bf16 dots are wrong; the GPU tests run bf16)."""
    generator = torch.Generator().manual_seed(value_dim)
    kernel = KERNELS[name](16)
    q, k, v = make_inputs((1, 40, 2, 16), value_dim, generator, torch.float16)
    state = prefix_state(1, 2, 16, value_dim, kernel, generator)
    check(*run_both(q, k, v, state, kernel, generator), rel_rms=1e-2)


LAUNCH_FORMS = [(True, False, 5, None), (True, False, 2, None), (False, True, 5, None), (False, False, 5, 128)]


@pytest.mark.parametrize(("flat", "low", "value_dim", "max_registers"), LAUNCH_FORMS,
                         ids=["flat", "flat-v2", "low", "register-cap"])  # fmt: skip
def test_launch_forms_match_reference(flat, low, value_dim, max_registers, monkeypatch):
    """The other forms a FusedLaunch selects: every [C, BF] tile from gathers and 0/1 dots (flat; at value dim 2
    the 0/1 dot is a product and a sum), 16-bit operands in the state's dots (low, fp16 here), and a register cap
    (only the GPU's compiler reads it; here it must pass through the launch), with chunks of 32."""
    launch = fused.FusedLaunch(chunk=32, flat=flat, low=low, max_registers=max_registers)
    monkeypatch.setattr(fused, "launches", lambda value_dim, poly: dict.fromkeys(("fwd", "dq", "dkdv"), launch))
    generator = torch.Generator().manual_seed(3)
    kernel = KERNELS["based"](16)
    dtype = torch.float16 if low else torch.float32
    q, k, v = make_inputs((1, 70, 1, 16), value_dim, generator, dtype)
    state = prefix_state(1, 1, 16, value_dim, kernel, generator)
    check(*run_both(q, k, v, state, kernel, generator), rel_rms=1e-2 if low else 1e-5)


def test_gpu_launch_tables_by_width_and_polynomial(monkeypatch):
    """On the GPU, value dims up to 8 take GPU_LAUNCHES for pure squares (ReBased) and GPU_LAUNCHES_LOW_TERMS for
    polynomials with a constant or linear term (Based); 9-16 take GPU_LAUNCHES_WIDE and GPU_LAUNCHES_WIDE_LOW_TERMS
    alike; wider ones GPU_LAUNCHES_WIDER, whatever the polynomial."""
    monkeypatch.setattr(fused, "interpreting", lambda: False)
    rebased, based = (PolynomialArgs.of(KERNELS[name](16)) for name in ("rebased", "based"))
    assert fused.launches(5, rebased) is fused.GPU_LAUNCHES
    assert fused.launches(1, rebased) is fused.GPU_LAUNCHES
    assert fused.launches(5, based) is fused.GPU_LAUNCHES_LOW_TERMS
    assert fused.launches(10, rebased) is fused.GPU_LAUNCHES_WIDE
    assert fused.launches(16, based) is fused.GPU_LAUNCHES_WIDE_LOW_TERMS
    assert fused.launches(17, rebased) is fused.GPU_LAUNCHES_WIDER
    assert fused.launches(64, based) is fused.GPU_LAUNCHES_WIDER


SPLIT_CASES = [("rebased", 13, True, [8, 4, 1]), ("based", 11, True, [8, 2, 1]), ("const_square", 10, False, [8, 2]),
               ("rebased", 5, True, [5])]  # fmt: skip


@pytest.mark.parametrize(("name", "value_dim", "with_state", "pieces"), SPLIT_CASES,
                         ids=[f"{case[0]}-v{case[1]}" for case in SPLIT_CASES])  # fmt: skip
def test_value_dims_split_into_powers_of_two_match_reference(name, value_dim, with_state, pieces, monkeypatch):
    """SPLIT_VALUES: one pass of the kernels per power-of-two piece of a value dim from 9 to 16 (5 stays whole), the
    outputs and final states' kv side by side, the pieces' dq, dk and d k_sum0 added by autograd: the reference's,
    from a state."""
    monkeypatch.setattr(fused, "SPLIT_VALUES", True)
    widths = []
    apply = fused.FusedChunkFunction.apply
    monkeypatch.setattr(fused.FusedChunkFunction, "apply", lambda q, k, v, *rest: widths.append(v.shape[-1])
                        or apply(q, k, v, *rest))  # fmt: skip
    generator = torch.Generator().manual_seed(value_dim)
    kernel = KERNELS[name](16)
    q, k, v = make_inputs((2, 19, 2, 16), value_dim, generator, torch.float32)
    state = prefix_state(2, 2, 16, value_dim, kernel, generator) if with_state else None
    check(*run_both(q, k, v, state, kernel, generator), rel_rms=1e-5)
    assert widths == pieces


def test_without_normalisation():
    generator = torch.Generator().manual_seed(8)
    kernel = KERNELS["based"](16)
    q, k, v = make_inputs((1, 33, 1, 16), 5, generator, torch.float32)
    state = prefix_state(1, 1, 16, 5, kernel, generator)
    check(*run_both(q, k, v, state, kernel, generator, normalize=False), rel_rms=1e-5)


def test_packed_sequences_with_initial_states():
    """cu_seqlens with an initial state per sequence (an empty sequence among them, its final state the initial
    one): each sequence's output, final state and gradients as the reference gives them for it alone."""
    generator = torch.Generator().manual_seed(31)
    kernel = KERNELS["based"](16)
    cu = torch.tensor([0, 20, 20, 25])
    q, k, v = make_inputs((1, 25, 2, 16), 5, generator, torch.float32)
    state = prefix_state(3, 2, 16, 5, kernel, generator)
    leaves = [q, k, v, *state]
    for x in leaves:
        x.requires_grad_(True)
    o, final = fused.packed_fused_chunk_linear_attention(
        q, k, v, cu.to(DEVICE), kernel=kernel, initial_state=state, output_final_state=True, normalize=True,
        eps=1e-12, chunk_size=64,
    )  # fmt: skip
    w = torch.randn(o.shape, generator=generator).to(DEVICE)
    grads = torch.autograd.grad((o.double() * w).sum() + final.kv.double().sum(), leaves)
    outs, kvs = [], []
    for n, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        initial = LinearAttentionState(state.kv[n : n + 1], state.k_sum[n : n + 1])
        if a == b:
            outs.append(v[:, a:b].double())
            kvs.append(initial.kv.double())
            continue
        ref_o, ref_final = linear_attention_reference(q[:, a:b], k[:, a:b], v[:, a:b], kernel=kernel,
                                                      initial_state=initial, output_final_state=True)  # fmt: skip
        outs.append(ref_o)
        kvs.append(ref_final.kv)
    ref_o, ref_kv = torch.cat(outs, 1), torch.cat(kvs)
    ref_grads = torch.autograd.grad((ref_o * w).sum() + ref_kv.sum(), leaves)
    assert_close(o, ref_o, rel_rms=1e-5, name="o")
    assert_close(final.kv, ref_kv, rel_rms=1e-5, name="kv")
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(g, r, rel_rms=1e-5, name=name)


def test_inference_without_final_state():
    """No gradients, no final state: o alone (no fp32 copy), the reference's."""
    generator = torch.Generator().manual_seed(5)
    kernel = KERNELS["rebased"](16)
    q, k, v = make_inputs((1, 20, 2, 16), 5, generator, torch.float16)
    with torch.no_grad():
        o, final = fused.fused_chunk_linear_attention(q, k, v, kernel=kernel, initial_state=None,
                                                      output_final_state=False, normalize=True, eps=1e-12,
                                                      chunk_size=64)  # fmt: skip
    assert final is None and o.dtype == torch.float16
    assert_close(o, linear_attention_reference(q, k, v, kernel=kernel)[0], rel_rms=1e-2, name="o")


def test_refuses_what_it_does_not_cover():
    options = dict(kernel=Polynomial.rebased(4), initial_state=None, output_final_state=False, normalize=True,
                   eps=1e-12, chunk_size=64)  # fmt: skip
    run = fused.fused_chunk_linear_attention
    wide = torch.zeros(1, 3, 1, 33, device=DEVICE)
    with pytest.raises(NotImplementedError, match="q/k dims up to 32"):
        run(wide, wide, wide[..., :8], **options)
    small = torch.zeros(1, 3, 1, 4, device=DEVICE)
    with pytest.raises(NotImplementedError, match="value dims up to 64"):
        run(small, small, torch.zeros(1, 3, 1, 65, device=DEVICE), **options)
    with pytest.raises(NotImplementedError, match="float64"):
        run(small.double(), small.double(), small.double(), **options)


# ---- which kernels a call runs --------------------------------------------------------------------------------


def spy_on_the_pair(monkeypatch):
    """Record which kernels the ("chunk", "triton") pair calls: the fused ones run, the chunk-states ones (slow
    under the interpreter, tested in test_triton_ops.py) answer v and no state."""
    calls = []
    for name in ("fused_chunk_linear_attention", "packed_fused_chunk_linear_attention"):
        real = getattr(dispatch, name)
        monkeypatch.setattr(dispatch, name, lambda *a, _real=real, **kw: calls.append("fused") or _real(*a, **kw))
    for name in ("chunk_states_linear_attention", "packed_chunk_states_linear_attention"):
        monkeypatch.setattr(dispatch, name, lambda q, k, v, *a, **kw: calls.append("chunk_states") or (v, None))
    return calls


@pytest.mark.parametrize(("sms", "value_dim", "fused_expected"), [(1, 5, True), (2, 5, False), (1, 17, False)])
def test_chunk_pair_runs_fused_kernels_for_many_small_heads(sms, value_dim, fused_expected, monkeypatch):
    """("chunk", "triton") takes the fused kernels where heads are small and (sequence, head) pairs fill the GPU
    (MIN_PROGRAMS_PER_SM = 4 per SM: 4 pairs here), chunk-states otherwise."""
    monkeypatch.setattr(dispatch, "sm_count", lambda device: sms)
    calls = spy_on_the_pair(monkeypatch)
    generator = torch.Generator().manual_seed(sms + value_dim)
    kernel = KERNELS["rebased"](4)
    q, k, v = make_inputs((1, 5, 4, 4), value_dim, generator, torch.float32)
    o, _ = IMPLEMENTATIONS[("chunk", "triton")](q, k, v, kernel=kernel, initial_state=None, output_final_state=False,
                                                normalize=True, eps=1e-12, chunk_size=64)  # fmt: skip
    assert calls == ["fused" if fused_expected else "chunk_states"]
    assert dispatch.prefers_fused_chunk(q, v, 1) == fused_expected
    if fused_expected:
        assert_close(o, linear_attention_reference(q, k, v, kernel=kernel)[0], rel_rms=1e-5, name="o")


def test_packed_chunk_pair_counts_the_packed_sequences(monkeypatch):
    monkeypatch.setattr(dispatch, "sm_count", lambda device: 1)
    calls = spy_on_the_pair(monkeypatch)
    q = k = torch.zeros(1, 6, 2, 4, device=DEVICE)
    v = torch.zeros(1, 6, 2, 5, device=DEVICE)
    options = dict(kernel=KERNELS["rebased"](4), initial_state=None, output_final_state=False, normalize=True,
                   eps=1e-12, chunk_size=64)  # fmt: skip
    VARLEN_IMPLEMENTATIONS[("chunk", "triton")](q, k, v, torch.tensor([0, 3, 6], device=DEVICE), **options)
    VARLEN_IMPLEMENTATIONS[("chunk", "triton")](q, k, v, torch.tensor([0, 6], device=DEVICE), **options)
    assert calls == ["fused", "chunk_states"]  # 2 sequences x 2 heads fill one SM's 4; then 1 x 2 do not


@pytest.mark.parametrize(("length", "heads", "expected"), [(512, 12, "chunk"), (511, 12, "parallel"),
                                                            (512, 1, "parallel"), (5000, 1, "chunk")])  # fmt: skip
def test_auto_mode_prefers_the_fused_chunk_kernels_from_a_length(length, heads, expected, monkeypatch):
    """mode="auto" on the compiled backend: chunk from AUTO_CHUNK_FROM_LENGTH where the fused kernels take the call,
    else the parallel crossover (4096) as before. (CUDA-only in use: the decision is checked on its own here.)"""
    monkeypatch.setattr(ops, "_runs_fused", lambda q, backend: True)
    monkeypatch.setattr(dispatch, "sm_count", lambda device: 1)
    q = torch.empty(1, length, heads, 16)
    v = torch.empty(1, length, heads, 5)
    mode = ops.pick_mode(q, "triton", None)
    assert ops.prefer_fused_chunk(mode, q, v, "triton", 1, length) == expected


# ---- GPU: compiled kernels at the MQAR models' shapes -----------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(
    ("name", "value_dim", "split"),
    [("rebased", 5, False), ("rebased", 16, False), ("based", 5, False), ("based", 11, False), ("rebased", 1, False),
     ("rebased", 2, False), ("based", 4, False), ("rebased", 13, True), ("based", 10, True)],
    ids=["rebased-v5", "rebased-v16", "based-v5", "based-v11", "ablation-v1", "ablation-v2", "ablation-v4",
         "split-v13", "split-v10"],
)  # fmt: skip
def test_gpu_mqar_shape_against_float64(dtype, name, value_dim, split, monkeypatch):
    """The MQAR models' heads (12 of q/k 16, value dims 1 to 16: 1, 2 and 4 are the kernel ablation's d_model 16-48;
    split: SPLIT_VALUES, 13 as 8 + 4 + 1 and 10 as 8 + 2) at L 2048, from a state: bf16 every gradient within
    1% relative RMS of float64 at every position, fp32 1e-4 overall (the chunk and parallel kernels' bound).
    Batch 4, not 512: the float64 reference keeps every step's state for its backward."""
    monkeypatch.setattr(fused, "SPLIT_VALUES", split)
    generator = torch.Generator().manual_seed(value_dim)
    kernel = KERNELS[name](16)
    q, k, v = make_inputs((4, 2048, 12, 16), value_dim, generator, dtype)
    state = prefix_state(4, 12, 16, value_dim, kernel, generator)
    got, want = run_both(q, k, v, state, kernel, generator)
    if dtype == torch.float32:
        check(got, want, rel_rms=1e-4)
        return
    check(got, want, rel_rms=1e-2)
    for grad_name, g, r in zip(GRAD_NAMES[:3], got[2], want[2]):
        worst = per_position_relative_error(g, r).max().item()
        assert worst <= 1e-2, f"{grad_name}: worst per-position rel-RMS {worst:.3e} (error {error_report(g, r)})"


@gpu
@needs_cuda
def test_gpu_mqar_batch_through_the_dispatcher_equals_the_parallel_kernel():
    """B 512, L 2048, 12 heads, q/k 16, v 5 in bf16, as an MQAR step runs it: mode="auto" reaches the fused chunk
    kernels, whose output and gradients match the parallel kernel's (each is within 1% of float64 on its own)."""
    generator = torch.Generator().manual_seed(512)
    kernel = KERNELS["rebased"](16)
    inputs = make_inputs((512, 2048, 12, 16), 5, generator, torch.bfloat16)
    w = torch.randn(inputs[2].shape, generator=generator).to(DEVICE)
    results = {}
    for mode in ("auto", "parallel"):
        leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
        o, _ = linear_attention(*leaves, mode=mode, backend="triton", kernel=kernel)
        results[mode] = (o, *torch.autograd.grad((o.float() * w).sum(), leaves))
    assert dispatch.prefers_chunk_mode(inputs[0], inputs[2], 512, 2048)
    for name, got, want in zip(("o", *GRAD_NAMES[:3]), results["auto"], results["parallel"]):
        assert_close(got, want, rel_rms=1e-2, name=name)
