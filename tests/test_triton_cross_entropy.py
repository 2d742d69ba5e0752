"""The fused cross-entropy rows (rebased.ops.triton.cross_entropy.softmax_grad_rows) against a float64 torch
reference computed from the same logits: the summed loss and dlogits = softmax - onehot, at awkward V (one
class, fewer than a block, exactly a block, one past it, several blocks), with ignored rows, in fp32, bf16 and
fp16; and linear_cross_entropy(backend="triton") against backend="torch" (loss and both gradients, fp32 and
under CPU bf16 autocast). Without CUDA the kernel runs under TRITON_INTERPRET=1 with 16-column blocks, so a
V of 17 or 100 walks the two-pass path and a V up to 16 the one-block path; gpu tests run the compiled kernel
at MQAR's and an LM's vocabulary."""

import pytest
import torch
import torch.nn.functional as F
from triton_setup import device_or_skip

HAS_CUDA = torch.cuda.is_available()

DEVICE = device_or_skip()

from rebased.ops.cross_entropy import linear_cross_entropy  # noqa: E402
from rebased.ops.triton import cross_entropy as fused  # noqa: E402
from rebased.ops.triton import launch  # noqa: E402
from rebased.ops.triton.cross_entropy import softmax_grad_rows  # noqa: E402
from rebased.ops.triton.launch import interpreting  # noqa: E402
from rebased.testing import assert_close  # noqa: E402

IGNORE = -100
SHIFT = 10.0


@pytest.fixture(autouse=True)
def row_kernel_only(monkeypatch):
    """linear_cross_entropy(backend="triton") here is the row kernel's route at every head width: the narrow
    heads that take the tile kernels by default have their own tests (test_triton_head_loss.py)."""
    from rebased.ops import cross_entropy

    monkeypatch.setattr(cross_entropy, "TILED_MAX_DIM", 0)


def loss_atol(rows, shift=SHIFT):
    """fp32 holds a row's lse (about its shift) to ~1e-7 of it, so the loss can be no closer than that."""
    return 1e-7 * max(1, rows) * (shift + 10)


def make_logits(rows, vocab, dtype=torch.float32, ignored=0.0, scale=4.0, shift=SHIFT, seed=0):
    """logits [rows, vocab], N(0, scale^2) plus a shift of up to +-shift per row, and targets [rows] with about
    `ignored` of them IGNORE."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * scale + (torch.rand(rows, 1, generator=g) - 0.5) * 2 * shift
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[torch.rand(rows, generator=g) < ignored] = IGNORE
    return logits.to(DEVICE, dtype), targets.to(DEVICE)


def reference(logits, targets, ignore_index=IGNORE):
    """(loss_sum, dlogits) in float64 from the same logits (upcast)."""
    z = logits.double()
    valid = targets != ignore_index
    safe = targets.masked_fill(~valid, 0)
    log_probs = torch.log_softmax(z, dim=1)
    loss = torch.where(valid, -log_probs.gather(1, safe[:, None]).squeeze(1), 0).sum()
    grad = log_probs.exp() - F.one_hot(safe, z.shape[1]).double()
    return loss, grad.masked_fill(~valid[:, None], 0)


@pytest.mark.parametrize("vocab", [1, 3, 16, 17, 40, 100])
@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("ignored", [0.0, 0.4])
def test_float32_matches_float64(vocab, rows, ignored):
    logits, targets = make_logits(rows, vocab, ignored=ignored, seed=vocab + rows)
    want_loss, want_grad = reference(logits, targets)
    pointer = logits.data_ptr()
    loss, grad = softmax_grad_rows(logits, targets, IGNORE)
    assert loss.shape == () and loss.dtype == torch.float32
    assert grad.dtype == torch.float32 and grad.shape == (rows, vocab)
    assert grad.data_ptr() == pointer  # in place by default
    assert_close(loss, want_loss, rel_rms=1e-6, atol=loss_atol(rows), name="loss")
    assert_close(grad, want_grad, rel_rms=1e-5, atol=1e-6, name="dlogits")


@pytest.mark.parametrize("vocab", [16, 100])
def test_rows_shifted_by_a_thousand(vocab):
    """Logits around +-1000, where an exp without the row max subtracted overflows: still finite and right. fp32
    spaces numbers near 1000 by 6e-5, so lse and the softmax exponents carry ~3e-5 of rounding (torch's fp32
    softmax as much): the tolerances say so."""
    logits, targets = make_logits(7, vocab, ignored=0.2, shift=1000.0, seed=vocab)
    want_loss, want_grad = reference(logits, targets)
    loss, grad = softmax_grad_rows(logits, targets, IGNORE)
    assert_close(loss, want_loss, rel_rms=1e-6, atol=loss_atol(7, 1000.0), name="loss")
    assert_close(grad, want_grad, rel_rms=1e-4, name="dlogits")


def test_all_rows_ignored_reads_nothing_and_writes_zeros():
    """Ignored rows are not read: even NaN or inf there gives loss 0 and zero gradients."""
    logits, targets = make_logits(5, 37)
    logits[1] = float("nan")
    logits[3, 4] = float("inf")
    targets[:] = IGNORE
    loss, grad = softmax_grad_rows(logits, targets, IGNORE)
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


def test_other_ignore_index_and_no_rows():
    logits, targets = make_logits(9, 20, seed=1)
    targets[::2] = 3  # a valid class index used as the ignore marker
    want_loss, want_grad = reference(logits, targets, ignore_index=3)
    loss, grad = softmax_grad_rows(logits, targets, 3)
    assert_close(loss, want_loss, rel_rms=1e-6, atol=loss_atol(9), name="loss")
    assert_close(grad, want_grad, rel_rms=1e-5, atol=1e-6, name="dlogits")
    loss, grad = softmax_grad_rows(logits[:0], targets[:0], IGNORE)
    assert loss.item() == 0.0 and grad.shape == (0, 20)


@pytest.mark.parametrize("vocab", [11, 50])
def test_not_in_place_and_loss_only_leave_the_logits(vocab):
    logits, targets = make_logits(6, vocab, ignored=0.3, seed=2)
    kept = logits.clone()
    want_loss, want_grad = reference(logits, targets)
    loss, grad = softmax_grad_rows(logits, targets, IGNORE, in_place=False)
    assert torch.equal(logits, kept) and grad.data_ptr() != logits.data_ptr()
    assert_close(grad, want_grad, rel_rms=1e-5, atol=1e-6, name="dlogits")
    loss_only, nothing = softmax_grad_rows(logits, targets, IGNORE, grad=False)
    assert nothing is None and torch.equal(logits, kept)
    assert_close(loss_only, want_loss, rel_rms=1e-6, atol=loss_atol(6), name="loss")
    assert torch.equal(loss_only, loss)


@pytest.mark.parametrize("vocab", [13, 40])
def test_rows_of_a_wider_buffer(vocab):
    """Logits [C, V] as a view of [C, S > V] (a padded row stride): read and written in place, the padding
    untouched."""
    buffer = torch.full((7, 48), 7.0, device=DEVICE)
    logits, targets = make_logits(7, vocab, ignored=0.3, seed=3)
    buffer[:, :vocab] = logits
    view = buffer[:, :vocab]
    want_loss, want_grad = reference(view, targets)
    for in_place in (False, True):
        loss, grad = softmax_grad_rows(view, targets, IGNORE, in_place=in_place)
        assert_close(loss, want_loss, rel_rms=1e-6, atol=loss_atol(7), name="loss")
        assert_close(grad, want_grad, rel_rms=1e-5, atol=1e-6, name="dlogits")
    assert (buffer[:, vocab:] == 7.0).all()
    assert torch.equal(view, grad)


@pytest.mark.parametrize("bad", [17, -1])
def test_out_of_range_target_gives_nan(bad):
    logits, targets = make_logits(4, 17, seed=4)
    targets[2] = bad
    loss, _ = softmax_grad_rows(logits, targets, IGNORE)
    assert loss.isnan()


# The interpreter rounds fp32 -> bf16 toward zero (triton.runtime.interpreter._convert_float without a rounding
# mode); compiled code rounds to nearest. So a bf16 dlogit is within one ulp (2^-7 relative) there, half an ulp
# on the GPU. fp16 goes through numpy, which rounds to nearest.
BF16_ROUNDING = 2.0**-7 if interpreting() else 2.0**-8


def assert_within_rounding(got, want, rel, subnormal=0.0):
    """Every element within rel of the exact value (1% more for the fp32 math before the rounding), or within
    the format's subnormal spacing."""
    error = (got.double() - want).abs()
    bound = want.abs() * rel * 1.01 + subnormal
    over = error > bound
    if over.any():
        raise AssertionError(
            f"{int(over.sum())} elements off by more than a rounding, e.g. {got[over][:3].tolist()} "
            f"for {want[over][:3].tolist()}"
        )


@pytest.mark.parametrize(
    "dtype, rel", [(torch.bfloat16, BF16_ROUNDING), (torch.float16, 2.0**-11)], ids=["bf16", "fp16"]
)
@pytest.mark.parametrize("vocab", [13, 40])
def test_half_logits_within_a_rounding_of_the_reference(dtype, rel, vocab):
    """Each dlogit is the exact value (from the same half-precision logits) rounded once to the logits' dtype:
    within rel of it (the rounding; 1% more for the fp32 math before it, and fp16's subnormal spacing); the
    loss, kept in fp32, much closer."""
    logits, targets = make_logits(9, vocab, dtype=dtype, ignored=0.2, scale=3.0, seed=5)
    want_loss, want_grad = reference(logits, targets)
    loss, grad = softmax_grad_rows(logits, targets, IGNORE)
    assert grad.dtype == dtype and loss.dtype == torch.float32
    assert_within_rounding(grad, want_grad, rel, subnormal=2.0**-24 if dtype == torch.float16 else 0.0)
    assert_close(loss, want_loss, rel_rms=1e-6, atol=loss_atol(9), name="loss")


def lce_inputs(rows, vocab, dim, ignored=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=g).to(DEVICE).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g) * 3 / dim**0.5).to(DEVICE).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[torch.rand(rows, generator=g) < ignored] = IGNORE
    return hidden, weight, targets.to(DEVICE)


def both_backends(hidden, weight, targets, **options):
    """{backend: (loss, grad hidden, grad weight)} of linear_cross_entropy."""
    results = {}
    for backend in ("torch", "triton"):
        loss = linear_cross_entropy(hidden, weight, targets, backend=backend, **options)
        results[backend] = (loss.detach(), *torch.autograd.grad(loss, (hidden, weight)))
    return results


@pytest.mark.parametrize("chunk_rows", [5, None])
def test_linear_cross_entropy_triton_matches_torch_fp32(chunk_rows):
    hidden, weight, targets = lce_inputs(23, 37, 8, seed=6)
    results = both_backends(hidden, weight, targets, chunk_rows=chunk_rows)
    for name, got, want in zip(("loss", "grad hidden", "grad weight"), results["triton"], results["torch"]):
        assert got.dtype == want.dtype
        assert_close(got, want, rel_rms=1e-5, name=name)
    with torch.no_grad():  # the loss-only launch
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows, backend="triton")
    assert_close(loss, results["torch"][0], rel_rms=1e-5, name="no-grad loss")
    frozen = weight.detach()  # dh only
    (grad_hidden,) = torch.autograd.grad(
        linear_cross_entropy(hidden, frozen, targets, chunk_rows=chunk_rows, backend="triton"), hidden
    )
    assert_close(grad_hidden, results["torch"][1], rel_rms=1e-5, name="grad hidden, frozen weight")


def test_linear_cross_entropy_triton_matches_torch_under_bf16_autocast():
    """The same bf16 logits in both; dlogits rounded to bf16 by each (rarely differing by an ulp), then the
    same bf16 matmuls."""
    hidden, weight, targets = lce_inputs(40, 50, 16, seed=7)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        results = both_backends(hidden, weight, targets, chunk_rows=16)
    (loss, *grads), (want_loss, *want_grads) = results["triton"], results["torch"]
    assert loss.dtype == torch.float32 and grads[0].dtype == grads[1].dtype == torch.float32
    assert_close(loss, want_loss, rel_rms=1e-6, name="loss")
    for name, got, want in zip(("grad hidden", "grad weight"), grads, want_grads):
        assert_close(got, want, rel_rms=1e-2, name=name)


def test_backend_choice(monkeypatch):
    hidden, weight, targets = lce_inputs(4, 5, 3)
    with pytest.raises(ValueError, match="unknown backend 'trition'"):
        linear_cross_entropy(hidden, weight, targets, backend="trition")
    with pytest.raises(NotImplementedError, match="float64 needs 'torch'"):
        linear_cross_entropy(hidden.double(), weight.double(), targets, backend="triton")
    if not HAS_CUDA:  # the interpreter runs the kernel on the CPU, but "auto" must not pick it there
        monkeypatch.setattr(fused, "softmax_grad_rows", lambda *a, **k: pytest.fail("auto ran the kernel on CPU"))
        linear_cross_entropy(hidden, weight, targets).backward()
        monkeypatch.setattr(launch, "interpreting", lambda: False)  # CPU tensors, compiled: refused
        with pytest.raises(NotImplementedError, match="needs CUDA tensors"):
            linear_cross_entropy(hidden, weight, targets, backend="triton")


def test_compiled_launch_config(monkeypatch):
    """Blocks of up to 8192 columns at 16 per thread: MQAR's V in one block of 16 warps, an LM's V in seven."""
    monkeypatch.setattr(fused, "interpreting", lambda: False)
    assert fused.launch_config(8192) == (8192, True, 16)
    assert fused.launch_config(50277) == (8192, False, 16)
    assert fused.launch_config(1000) == (1024, True, 2)
    assert fused.launch_config(3) == (16, True, 1)


@pytest.mark.parametrize(
    "logits, targets, options, message",
    [
        (torch.zeros(4), None, {}, "logits must be a 2-D tensor"),
        (torch.zeros(2, 4, 3), None, {}, "logits must be a 2-D tensor"),
        ([[0.0]], None, {}, "logits must be a 2-D tensor"),
        (torch.zeros(4, 3, dtype=torch.int64), None, {}, "float32, bfloat16 or float16, got torch.int64"),
        (torch.zeros(4, 3, dtype=torch.float64), None, {}, "float32, bfloat16 or float16, got torch.float64"),
        (torch.zeros(3, 4).T, None, {}, "must be contiguous"),
        (torch.zeros(4, 6)[:, ::2], None, {}, "must be contiguous"),
        (torch.zeros(4, 0), None, {}, "at least one class"),
        (None, torch.zeros(4, dtype=torch.int32), {}, "targets must be a 1-D int64"),
        (None, torch.zeros(4, 1, dtype=torch.int64), {}, "targets must be a 1-D int64"),
        (None, [0, 1, 2, 0], {}, "targets must be a 1-D int64"),
        (None, torch.zeros(5, dtype=torch.int64), {}, "targets has 5 entries, logits has 4 rows"),
        (None, torch.zeros(4, dtype=torch.int64, device="meta"), {}, "different devices"),
        (None, None, dict(ignore_index=-100.0), "ignore_index must be an int"),
        (None, None, dict(ignore_index=True), "ignore_index must be an int"),
    ],
)
def test_bad_inputs(logits, targets, options, message):
    logits = torch.zeros(4, 3) if logits is None else logits
    targets = torch.zeros(4, dtype=torch.int64) if targets is None else targets

    def move(t):
        return t.to(DEVICE) if isinstance(t, torch.Tensor) and t.device.type == "cpu" else t

    with pytest.raises(ValueError, match=message):
        softmax_grad_rows(move(logits), move(targets), options.get("ignore_index", IGNORE))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("vocab, stride", [(8192, 8192), (50277, 50277), (50277, 50304)])
def test_gpu_real_shapes(vocab, stride, dtype):
    """A default-size chunk of MQAR (V 8192: one block, read once, 16-byte loads) and of an LM (V 50277: two
    passes; rows not 16-byte aligned, so scalar loads; and the same rows in a buffer padded to a stride of
    50304, which compiles to 16-byte loads): the compiled kernel against float64, within a rounding."""
    logits, targets = make_logits(4096, vocab, dtype=dtype, ignored=0.2, scale=3.0, seed=8)
    if stride != vocab:
        buffer = torch.empty(4096, stride, dtype=dtype, device=DEVICE)
        buffer[:, :vocab] = logits
        logits = buffer[:, :vocab]
    want_loss, want_grad = reference(logits, targets)
    loss, grad = softmax_grad_rows(logits, targets, IGNORE)
    assert grad.dtype == dtype
    assert_close(loss, want_loss, rel_rms=1e-6, name="loss")
    if dtype == torch.float32:
        assert_close(grad, want_grad, rel_rms=1e-5, atol=1e-6, name="dlogits")
    else:
        assert_within_rounding(grad, want_grad, BF16_ROUNDING)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("vocab", [8192, 50277])
def test_gpu_linear_cross_entropy_triton_matches_torch(vocab):
    """Two default chunks (and a part) of 4096 rows at V 8192, more at 50277, under bf16 autocast."""
    hidden, weight, targets = lce_inputs(8192 + 100, vocab, 64, seed=9)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        results = both_backends(hidden, weight, targets)
    (loss, *grads), (want_loss, *want_grads) = results["triton"], results["torch"]
    assert_close(loss, want_loss, rel_rms=1e-5, name="loss")
    for name, got, want in zip(("grad hidden", "grad weight"), grads, want_grads):
        assert_close(got, want, rel_rms=1e-2, name=name)
