"""The short-convolution kernels (rebased.ops.triton.short_conv) against torch's Conv1d in float64: outputs and
the gradients of x, the weight and the bias at awkward sizes (T of 1, T shorter than the taps, channels and
steps off the tiles, one tap), without a bias, 16-bit inputs; the output dtype under autocast; the same bits on
every call; rebased.ops.short_conv and the ShortConv module through their backends. Without CUDA the kernels
run under TRITON_INTERPRET=1 with 8 x 16 tiles; gpu tests run the compiled kernels at an MQAR micro-batch's
shape and inside a CUDA graph."""

import pytest
import torch
from triton_setup import device_or_skip, replayed

HAS_CUDA = torch.cuda.is_available()

DEVICE = device_or_skip()

from rebased.ops import conv as ops_conv  # noqa: E402
from rebased.ops.triton import launch  # noqa: E402
from rebased.ops.triton import short_conv as kernel  # noqa: E402
from rebased.testing import assert_close  # noqa: E402


def conv_inputs(batch, steps, channels, taps, bias=True, seed=0, dtype=torch.float32):
    """(x [B, T, C] in dtype, weight [C, 1, K] and bias [C] or None in fp32, dy [B, T, C] in dtype), as leaves."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, steps, channels, generator=g)
    weight = torch.randn(channels, 1, taps, generator=g) / taps**0.5
    b = torch.randn(channels, generator=g) if bias else None
    dy = torch.randn(batch, steps, channels, generator=g)
    leaf = lambda t, d: None if t is None else t.to(DEVICE, d).requires_grad_()  # noqa: E731
    return leaf(x, dtype), leaf(weight, torch.float32), leaf(b, torch.float32), dy.to(DEVICE, dtype)


def gradients(y, inputs, dy):
    wanted = [t for t in inputs if t is not None]
    return list(torch.autograd.grad(y, wanted, dy.to(y.dtype)))


def float64_reference(x, weight, bias, dy):
    """torch's Conv1d path (backend "torch") on float64 copies: (y, [dx, dW, dbias])."""
    copies = [None if t is None else t.detach().double().requires_grad_() for t in (x, weight, bias)]
    y = ops_conv.short_conv(*copies, backend="torch")
    return y, gradients(y, copies, dy.double())


@pytest.mark.parametrize(
    "batch, steps, channels, taps, bias",
    [
        (2, 13, 20, 3, True),  # steps and channels off the 8 x 16 tiles
        (1, 1, 7, 3, True),  # one step: only the last tap sees data
        (3, 2, 16, 4, False),  # fewer steps than taps, no bias
        (2, 17, 33, 1, True),  # one tap: a per-channel scale
        (1, 40, 5, 5, True),  # several time tiles a sequence
    ],
)
def test_matches_float64_conv1d(batch, steps, channels, taps, bias):
    x, weight, b, dy = conv_inputs(batch, steps, channels, taps, bias)
    y = ops_conv.short_conv(x, weight, b, backend="triton")
    assert y.shape == x.shape and y.dtype == torch.float32
    want_y, want_grads = float64_reference(x, weight, b, dy)
    assert_close(y, want_y, rel_rms=1e-6, atol=1e-6, name="y")
    for name, got, want in zip(("dx", "dW", "dbias"), gradients(y, (x, weight, b), dy), want_grads):
        assert got.dtype == torch.float32
        assert_close(got, want, rel_rms=1e-6, atol=1e-6, name=name)


def test_sixteen_bit_inputs_and_autocast_output():
    """fp16 x (bf16 on the GPU; the interpreter's bf16 is not trusted): y and dx in x's dtype, dW and dbias in the
    parameters' fp32, all within 16-bit rounding of float64; under autocast y takes autocast's dtype."""
    dtype = torch.bfloat16 if HAS_CUDA else torch.float16
    x, weight, b, dy = conv_inputs(2, 19, 24, 3, dtype=dtype, seed=1)
    y = ops_conv.short_conv(x, weight, b, backend="triton")
    grads = gradients(y, (x, weight, b), dy)
    assert y.dtype == grads[0].dtype == dtype and grads[1].dtype == grads[2].dtype == torch.float32
    want_y, want_grads = float64_reference(x, weight, b, dy)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert_close(y, want_y, rel_rms=tolerance, name="y")
    for name, got, want in zip(("dx", "dW", "dbias"), grads, want_grads):
        assert_close(got, want, rel_rms=tolerance, name=name)
    with torch.autocast(DEVICE, dtype=dtype):
        assert ops_conv.short_conv(x.float(), weight, b, backend="triton").dtype == dtype


def test_same_bits_every_call():
    x, weight, b, dy = conv_inputs(3, 30, 20, 4, seed=2)
    first = [ops_conv.short_conv(x, weight, b, backend="triton")]
    first += gradients(first[0], (x, weight, b), dy)
    second = [ops_conv.short_conv(x, weight, b, backend="triton")]
    second += gradients(second[0], (x, weight, b), dy)
    assert all(torch.equal(a, c) for a, c in zip(first, second))


def test_short_conv_module_through_its_backends(monkeypatch):
    """ShortConv (the BaseConv, Hyena and Mamba mixers' convolution): the same parameters and state dict whatever
    the backend; "triton" gives the torch output and gradients; "auto" runs the kernels only on CUDA with
    SHORT_CONV_TRITON_ON_GPU set."""
    from rebased.mixers import ShortConv

    calls = []
    monkeypatch.setattr(kernel, "short_conv", lambda *a: calls.append(1) or kernel.ShortConvFunction.apply(*a))
    monkeypatch.setattr(ops_conv, "SHORT_CONV_TRITON_ON_GPU", False)
    reference = ShortConv(12, 3, backend="torch").to(DEVICE)
    x = conv_inputs(2, 9, 12, 3, seed=3)[0]
    want = reference(x)
    want.square().sum().backward()
    for backend in ("triton", "auto"):
        module = ShortConv(12, 3, backend=backend).to(DEVICE)
        module.load_state_dict(reference.state_dict())
        got = module(x)
        got.square().sum().backward()
        assert_close(got, want, rel_rms=1e-6, atol=1e-6, name=backend)
        for name, p in module.named_parameters():
            assert_close(p.grad, dict(reference.named_parameters())[name].grad, rel_rms=1e-5, atol=1e-6, name=name)
    assert calls == [1]  # "auto": torch, SHORT_CONV_TRITON_ON_GPU being off (as set above)
    monkeypatch.setattr(ops_conv, "SHORT_CONV_TRITON_ON_GPU", True)
    ShortConv(12, 3, backend="auto")(x.detach().cpu())  # CPU tensors: torch even so
    assert calls == [1]
    if HAS_CUDA:
        ShortConv(12, 3, backend="auto").to(DEVICE)(x)
        assert calls == [1, 1]


@pytest.mark.parametrize(
    "x_shape, w_shape, error, message",
    [
        ((2, 5), (5, 1, 3), ValueError, r"x \[B, T, C\]"),
        ((2, 5, 4), (3, 1, 3), ValueError, r"weight \[C, 1, K\]"),
        ((2, 5, 4), (4, 1, 17), NotImplementedError, "up to 16 taps"),
    ],
)
def test_bad_inputs(x_shape, w_shape, error, message):
    with pytest.raises(error, match=message):
        kernel.short_conv(torch.zeros(x_shape, device=DEVICE), torch.zeros(w_shape, device=DEVICE), None, torch.float32)


def test_refuses_what_it_does_not_implement(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'trition'"):
        ops_conv.short_conv(torch.zeros(1, 2, 3), torch.zeros(3, 1, 2), None, backend="trition")
    monkeypatch.setattr(launch, "interpreting", lambda: False)  # CPU tensors, compiled: refused at the call
    with pytest.raises(NotImplementedError, match="needs CUDA tensors"):
        ops_conv.short_conv(torch.zeros(1, 2, 3), torch.zeros(3, 1, 2), None, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_mqar_micro_batch():
    """128 sequences of L 2048, d_model 64, 3 taps, bf16 x (the MQAR BaseConv's): against float64, and the
    same bits twice."""
    x, weight, b, dy = conv_inputs(128, 2048, 64, 3, dtype=torch.bfloat16, seed=4)
    y = ops_conv.short_conv(x, weight, b, backend="triton")
    grads = gradients(y, (x, weight, b), dy)
    want_y, want_grads = float64_reference(x, weight, b, dy)
    assert_close(y, want_y, rel_rms=1e-2, name="y")
    for name, got, want in zip(("dx", "dW", "dbias"), grads, want_grads):
        assert_close(got, want, rel_rms=1e-2, name=name)
    again = gradients(ops_conv.short_conv(x, weight, b, backend="triton"), (x, weight, b), dy)
    assert all(torch.equal(a, c) for a, c in zip(grads, again))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_captured_in_a_cuda_graph():
    """Forward and backward in one CUDA graph: a replay on new inputs gives what an eager call gives."""
    x, weight, b, dy = conv_inputs(4, 256, 48, 3, seed=5)

    def step():
        return gradients(ops_conv.short_conv(x, weight, b, backend="triton"), (x, weight, b), dy)

    new_x, _, _, new_dy = conv_inputs(4, 256, 48, 3, seed=6)
    outputs, eager = replayed(step, (x, dy), (new_x, new_dy))
    assert all(torch.equal(a, c) for a, c in zip(outputs, eager))


def test_no_steps_gives_zero_weight_and_bias_gradients():
    """T = 0: no backward program runs, so the weight and bias gradients, sums over no partials, must be zeros
    (torch's Conv1d refuses an empty time axis, so no reference)."""
    x, weight, b, dy = conv_inputs(2, 0, 5, 3)
    y = ops_conv.short_conv(x, weight, b, backend="triton")
    dx, dw, db = gradients(y, (x, weight, b), dy)
    assert y.shape == dx.shape == (2, 0, 5)
    assert torch.equal(dw, torch.zeros_like(weight)) and torch.equal(db, torch.zeros_like(b))
