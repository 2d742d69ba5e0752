"""The selective-scan kernels (rebased.ops.triton.selective_scan) against the torch chunked scan in float64: y,
the final state and the gradients of x, dt, A, B, C and the initial state, at awkward sizes (one step, channels
and state sizes off the blocks, a length across the torch form's chunks), 16-bit inputs, the final state alone
carrying a gradient; rebased.ops.selective_scan and the Mamba mixer through their backends. Without CUDA the
kernels run under TRITON_INTERPRET=1 with blocks of 8 channels and tiles of 4 steps (the lengths leave ragged
last tiles); gpu tests run the compiled kernels at an MQAR micro-batch's shape and inside a CUDA graph."""

import pytest
import torch
from triton_setup import device_or_skip, replayed

HAS_CUDA = torch.cuda.is_available()

DEVICE = device_or_skip()

from rebased.ops import scan as ops_scan  # noqa: E402
from rebased.ops.triton import launch  # noqa: E402
from rebased.testing import assert_close  # noqa: E402

NAMES = ("dx", "ddt", "dA", "dB", "dC", "dh0")


def scan_inputs(batch, steps, channels, size, seed=0, dtype=torch.float32):
    """Leaves x, dt (> 0, softplus'd), A (< 0), B, C, h0 as Mamba makes them, and weights for y and the final h."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, steps, channels, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(batch, steps, channels, generator=g) - 2)
    a = -torch.rand(channels, size, generator=g) * 2 - 0.1
    b, c = (torch.randn(batch, steps, size, generator=g) for _ in range(2))
    h0 = torch.randn(batch, channels, size, generator=g)
    weights = (torch.randn(batch, steps, channels, generator=g), torch.randn(batch, channels, size, generator=g))
    leaves = [t.to(DEVICE, dtype if i in (0, 1, 3, 4) else torch.float32).requires_grad_()
              for i, t in enumerate((x, dt, a, b, c, h0))]  # fmt: skip
    return leaves, [w.to(DEVICE) for w in weights]


def run(leaves, weights, backend, chunk=8):
    """y, the final h and the gradients of sum(w_y y) + sum(w_h h)."""
    y, h = ops_scan.selective_scan(*leaves, chunk=chunk, backend=backend)
    loss = (y.double() * weights[0]).sum() + (h.double() * weights[1]).sum()
    return y, h, torch.autograd.grad(loss, leaves)


def float64_reference(leaves, weights):
    copies = [t.detach().double().requires_grad_() for t in leaves]
    return run(copies, weights, "torch")


@pytest.mark.parametrize(
    "batch, steps, channels, size",
    [
        (2, 37, 20, 5),  # channels off the blocks of 8, state size off a power of two, steps across chunks of 8
        (1, 1, 8, 8),  # one step
        (3, 16, 3, 16),  # fewer channels than a block
    ],
)
def test_matches_float64_torch_scan(batch, steps, channels, size):
    leaves, weights = scan_inputs(batch, steps, channels, size)
    y, h, grads = run(leaves, weights, "triton")
    assert y.dtype == h.dtype == torch.float32 and y.shape == leaves[0].shape and h.shape == leaves[5].shape
    want_y, want_h, want_grads = float64_reference(leaves, weights)
    assert_close(y, want_y, rel_rms=1e-5, atol=1e-6, name="y")
    assert_close(h, want_h, rel_rms=1e-5, atol=1e-6, name="h")
    for name, got, want in zip(NAMES, grads, want_grads):
        assert_close(got, want, rel_rms=1e-5, atol=1e-6, name=name)


def test_16_bit_inputs_and_gradients_in_their_dtypes():
    """x, dt, B, C in fp16 (autocast's projections): fp32 math, each gradient in its input's dtype."""
    leaves, weights = scan_inputs(2, 21, 12, 8, seed=1, dtype=torch.float16)
    y, h, grads = run(leaves, weights, "triton")
    assert [g.dtype for g in grads] == [t.dtype for t in leaves]
    want_y, want_h, want_grads = float64_reference(leaves, weights)
    assert_close(y, want_y, rel_rms=1e-5, atol=1e-6, name="y")
    for name, got, want in zip(NAMES, grads, want_grads):
        assert_close(got, want, rel_rms=2e-3, atol=1e-4, name=name)


def test_final_state_alone_carries_the_gradient():
    """Only the final state in the loss (a prefill whose output is dropped): dh_last flows back alone."""
    leaves, _ = scan_inputs(2, 19, 10, 4, seed=2)
    got = torch.autograd.grad(ops_scan.selective_scan(*leaves, chunk=8, backend="triton")[1].sum(), leaves)
    copies = [t.detach().double().requires_grad_() for t in leaves]
    final = ops_scan.selective_scan(*copies, chunk=8, backend="torch")[1].sum()
    want = torch.autograd.grad(final, copies, allow_unused=True)  # C reaches only y
    for name, g, w, t in zip(NAMES, got, want, copies):
        assert_close(g, torch.zeros_like(t) if w is None else w, rel_rms=1e-5, atol=1e-6, name=name)


def test_mamba_mixer_through_its_backends(monkeypatch):
    """The Mamba mixer: the same output and parameter gradients with the kernel as with the torch scan; "auto"
    takes the kernel only on CUDA with SCAN_TRITON_ON_GPU set."""
    from rebased.config import MambaConfig
    from rebased.mixers.mamba import Mamba

    calls = []
    kernels = ops_scan.importlib.import_module(ops_scan._KERNEL_MODULE)
    original = kernels.selective_scan
    monkeypatch.setattr(kernels, "selective_scan", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(ops_scan, "SCAN_TRITON_ON_GPU", False)
    torch.manual_seed(0)
    mixer = Mamba(16, MambaConfig(d_state=8, chunk_size=8)).to(DEVICE)
    u = torch.randn(2, 23, 16, device=DEVICE)
    outputs = {}
    for backend in ("torch", "triton", "auto"):
        mixer.zero_grad()
        mixer.scan_backend = backend
        out = mixer(u)
        out.square().sum().backward()
        outputs[backend] = (out.detach(), {n: p.grad.clone() for n, p in mixer.named_parameters()})
    assert calls == [1]  # "auto": torch, SCAN_TRITON_ON_GPU being off
    for backend in ("triton", "auto"):
        assert_close(outputs[backend][0], outputs["torch"][0], rel_rms=1e-5, atol=1e-6, name=backend)
        for name, grad in outputs[backend][1].items():
            assert_close(grad, outputs["torch"][1][name], rel_rms=1e-4, atol=1e-6, name=f"{backend} {name}")
    monkeypatch.setattr(ops_scan, "SCAN_TRITON_ON_GPU", True)
    mixer.scan_backend = "auto"
    mixer(u)
    assert calls == ([1, 1] if HAS_CUDA else [1])  # CPU tensors: torch even so


def test_refuses_what_it_does_not_implement(monkeypatch):
    leaves, _ = scan_inputs(1, 3, 4, 2)
    with pytest.raises(ValueError, match="unknown backend 'trition'"):
        ops_scan.selective_scan(*leaves, chunk=8, backend="trition")
    double = [t.detach().double() for t in leaves]
    with pytest.raises(NotImplementedError, match="float64 state"):
        ops_scan.selective_scan(*double, chunk=8, backend="triton")
    monkeypatch.setattr(launch, "interpreting", lambda: False)  # CPU tensors, compiled: refused at the call
    if DEVICE == "cpu":
        with pytest.raises(NotImplementedError, match="needs CUDA tensors"):
            ops_scan.selective_scan(*leaves, chunk=8, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_mqar_micro_batch():
    """16 sequences of L 2048, Din 128, N 8 (the MQAR Mamba's at d_model 64), bf16 x, dt, B, C: against float64,
    and the same bits twice."""
    leaves, weights = scan_inputs(16, 2048, 128, 8, seed=4, dtype=torch.bfloat16)
    y, h, grads = run(leaves, weights, "triton")
    want_y, want_h, want_grads = float64_reference(leaves, weights)
    assert_close(y, want_y, rel_rms=1e-4, name="y")
    assert_close(h, want_h, rel_rms=1e-4, name="h")
    for name, got, want in zip(NAMES, grads, want_grads):
        assert_close(got, want, rel_rms=1e-2, name=name)
    again = run(leaves, weights, "triton")[2]
    assert all(torch.equal(a, c) for a, c in zip(grads, again))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_captured_in_a_cuda_graph():
    """Forward and backward in one CUDA graph: a replay on new inputs gives what an eager call gives."""
    leaves, weights = scan_inputs(4, 256, 64, 8, seed=5)

    def step():
        return run(leaves, weights, "triton")[2]

    outputs, eager = replayed(step, leaves, scan_inputs(4, 256, 64, 8, seed=6)[0])
    for name, got, want in zip(NAMES, outputs, eager):
        assert torch.equal(got, want), name


def test_no_steps_passes_the_state_through():
    """T = 0: no program runs; y is empty, the final state is h0, dA is zeros and h0's gradient is the final
    state's (the torch form cannot take an empty time axis, so no reference)."""
    leaves, weights = scan_inputs(2, 0, 4, 3)
    y, h, grads = run(leaves, weights, "triton")
    assert y.shape == (2, 0, 4) and torch.equal(h, leaves[5].detach())
    assert torch.equal(grads[2], torch.zeros_like(leaves[2]))
    assert torch.equal(grads[5], weights[1].float())
