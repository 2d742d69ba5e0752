"""The WKV kernels (rebased.ops.triton.wkv) against the torch chunked form in float64: y, the final state and the
gradients of w, u, k and v, at awkward sizes (one token, channels off the blocks, a length across the torch
form's chunks), keys large enough to overflow a naive exp, 16-bit inputs, no tokens; rebased.ops.rwkv and the RWKV
mixer through their backends. Without CUDA the kernels run under TRITON_INTERPRET=1 with blocks of 8 channels and
tiles of 4 tokens (lengths off the tiles leave a ragged last tile); gpu tests run the compiled kernels at an MQAR
micro-batch's shape and inside a CUDA graph."""

import pytest
import torch
from triton_setup import device_or_skip, replayed

HAS_CUDA = torch.cuda.is_available()

DEVICE = device_or_skip()

from rebased.ops import rwkv as ops_wkv  # noqa: E402
from rebased.ops.triton import launch  # noqa: E402
from rebased.testing import assert_close  # noqa: E402

NAMES = ("dw", "du", "dk", "dv")


def wkv_inputs(batch, steps, channels, seed=0, dtype=torch.float32, key_scale=1.0):
    """Leaves w (< 0, RWKV-4's spread of decays), u, k, v, and a weight for y."""
    g = torch.Generator().manual_seed(seed)
    w = -torch.exp(torch.linspace(-5, 3, channels) + 0.1 * torch.randn(channels, generator=g))
    u = torch.randn(channels, generator=g)
    k = torch.randn(batch, steps, channels, generator=g) * key_scale
    v = torch.randn(batch, steps, channels, generator=g)
    weight = torch.randn(batch, steps, channels, generator=g)
    leaves = [t.to(DEVICE, dtype if i >= 2 else torch.float32).requires_grad_() for i, t in enumerate((w, u, k, v))]
    return leaves, weight.to(DEVICE)


def run(leaves, weight, backend, chunk=8):
    """y, the final state and the gradients of sum(weight * y)."""
    y, state = ops_wkv.wkv(*leaves, chunk=chunk, backend=backend)
    return y, state, torch.autograd.grad((y.double() * weight).sum(), leaves)


def float64_reference(leaves, weight):
    return run([t.detach().double().requires_grad_() for t in leaves], weight, "torch")


def check_against_float64(leaves, weight, rel_rms=1e-5, grad_rel_rms=1e-5):
    y, state, grads = run(leaves, weight, "triton")
    assert y.dtype == torch.float32 and y.shape == leaves[2].shape
    assert [g.dtype for g in grads] == [t.dtype for t in leaves]
    want_y, want_state, want_grads = float64_reference(leaves, weight)
    assert_close(y, want_y, rel_rms=rel_rms, atol=1e-6, name="y")
    for name, got, want in zip(("a", "b", "p"), state, want_state):
        assert_close(got, want, rel_rms=rel_rms, atol=1e-6, name=name)
    for name, got, want in zip(NAMES, grads, want_grads):
        assert_close(got, want, rel_rms=grad_rel_rms, atol=1e-6, name=name)


@pytest.fixture(params=[True, False], ids=["prefetch", "no-prefetch"])
def prefetch(request, monkeypatch):
    """Both forms of the kernels' loads: the next tile during a walk, or each tile before its own."""
    kernels = ops_wkv.importlib.import_module(ops_wkv._KERNEL_MODULE)
    monkeypatch.setattr(kernels, "INTERPRETER_PREFETCH", request.param)
    monkeypatch.setattr(kernels, "GPU_PREFETCH", request.param)


@pytest.mark.parametrize(
    "batch, steps, channels",
    [
        (2, 37, 20),  # channels off the blocks of 8, tokens across the torch form's chunks of 8
        (1, 1, 8),  # one token
        (3, 16, 3),  # fewer channels than a block
    ],
)
def test_matches_float64_torch_wkv(batch, steps, channels, prefetch):
    leaves, weight = wkv_inputs(batch, steps, channels)
    check_against_float64(leaves, weight)


def test_keys_past_exp_range_stay_exact(prefetch):
    """Keys of size ~100-300, where exp overflows in fp32 (max ~88): the running maxima keep every exponential
    finite, forward and backward."""
    leaves, weight = wkv_inputs(2, 29, 12, seed=1, key_scale=100.0)
    assert leaves[2].abs().max() > 200
    check_against_float64(leaves, weight)


def test_16_bit_inputs_and_gradients_in_their_dtypes():
    """k and v in bf16 (autocast's projections): fp32 math, each gradient in its input's dtype (dk and dv within
    bf16's rounding: a relative error up to 2^-9 an element)."""
    leaves, weight = wkv_inputs(2, 21, 12, seed=2, dtype=torch.bfloat16)
    check_against_float64(leaves, weight, grad_rel_rms=4e-3)


def test_no_tokens_gives_the_empty_state():
    """T = 0: y is empty, the final state is the empty one and every gradient is zero; the torch form gives the
    same y and state from no chunks."""
    leaves, weight = wkv_inputs(2, 0, 5)
    y, state, grads = run(leaves, weight, "triton")
    assert y.shape == (2, 0, 5)
    want = ops_wkv.empty_state(2, 5, y)
    assert all(torch.equal(got, expected) for got, expected in zip(state, want))
    assert all(torch.equal(g, torch.zeros_like(t)) for g, t in zip(grads, leaves))
    torch_y, torch_state = ops_wkv.wkv(*leaves, chunk=8, backend="torch")
    assert torch.equal(torch_y, y) and all(torch.equal(got, expected) for got, expected in zip(torch_state, want))


def test_rwkv_mixer_through_its_backends(monkeypatch):
    """The RWKV mixer: the same output, state and parameter gradients with the kernels as with the torch form;
    "auto" takes the kernels only on CUDA with WKV_TRITON_ON_GPU set."""
    from rebased.config import RWKVConfig
    from rebased.mixers.rwkv import RWKV

    calls = []
    kernels = ops_wkv.importlib.import_module(ops_wkv._KERNEL_MODULE)
    original = kernels.wkv
    monkeypatch.setattr(kernels, "wkv", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(ops_wkv, "WKV_TRITON_ON_GPU", False)
    torch.manual_seed(0)
    mixer = RWKV(16, RWKVConfig(chunk_size=8)).to(DEVICE)
    x = torch.randn(2, 23, 16, device=DEVICE)
    outputs = {}
    for backend in ("torch", "triton", "auto"):
        mixer.zero_grad()
        mixer.wkv_backend = backend
        out, state = mixer.prefill(x)
        out.square().sum().backward()
        outputs[backend] = (out.detach(), state.wkv, {n: p.grad.clone() for n, p in mixer.named_parameters()})
    assert calls == [1]  # "auto": torch, WKV_TRITON_ON_GPU being off
    for backend in ("triton", "auto"):
        assert_close(outputs[backend][0], outputs["torch"][0], rel_rms=1e-5, atol=1e-6, name=backend)
        for name, got, want in zip(("a", "b", "p"), outputs[backend][1], outputs["torch"][1]):
            assert_close(got, want, rel_rms=1e-5, atol=1e-6, name=f"{backend} state {name}")
        for name, grad in outputs[backend][2].items():
            assert_close(grad, outputs["torch"][2][name], rel_rms=1e-4, atol=1e-6, name=f"{backend} {name}")
    monkeypatch.setattr(ops_wkv, "WKV_TRITON_ON_GPU", True)
    mixer.wkv_backend = "auto"
    mixer(x)
    assert calls == ([1, 1] if HAS_CUDA else [1])  # CPU tensors: torch even so


def test_refuses_what_it_does_not_implement(monkeypatch):
    leaves, _ = wkv_inputs(1, 3, 4)
    with pytest.raises(ValueError, match="unknown backend 'trition'"):
        ops_wkv.wkv(*leaves, chunk=8, backend="trition")
    double = [t.detach().double() for t in leaves]
    with pytest.raises(NotImplementedError, match="float64 inputs"):
        ops_wkv.wkv(*double, chunk=8, backend="triton")
    monkeypatch.setattr(launch, "interpreting", lambda: False)  # CPU tensors, compiled: refused at the call
    if DEVICE == "cpu":
        with pytest.raises(NotImplementedError, match="needs CUDA tensors"):
            ops_wkv.wkv(*leaves, chunk=8, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_mqar_micro_batch(prefetch):
    """128 sequences of L 2048, D 64 (the MQAR RWKV's micro-batch at d_model 64), bf16 k and v: against float64,
    and the same bits twice."""
    leaves, weight = wkv_inputs(128, 2048, 64, seed=4, dtype=torch.bfloat16)
    y, state, grads = run(leaves, weight, "triton")
    want_y, want_state, want_grads = float64_reference(leaves, weight)
    assert_close(y, want_y, rel_rms=1e-4, name="y")
    for name, got, want in zip(("a", "b", "p"), state, want_state):
        assert_close(got, want, rel_rms=1e-4, name=name)
    for name, got, want in zip(NAMES, grads, want_grads):
        assert_close(got, want, rel_rms=4e-3 if name in ("dk", "dv") else 1e-4, name=name)
    again = run(leaves, weight, "triton")[2]
    assert all(torch.equal(a, c) for a, c in zip(grads, again))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_captured_in_a_cuda_graph():
    """Forward and backward in one CUDA graph: a replay on new inputs gives what an eager call gives."""
    leaves, weight = wkv_inputs(4, 256, 64, seed=5)

    def step():
        return run(leaves, weight, "triton")[2]

    outputs, eager = replayed(step, leaves, wkv_inputs(4, 256, 64, seed=6)[0])
    for name, got, want in zip(NAMES, outputs, eager):
        assert torch.equal(got, want), name
