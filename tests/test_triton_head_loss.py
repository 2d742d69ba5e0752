"""The head + cross-entropy tile kernels (rebased.ops.triton.head_loss.head_loss_tiles) against float64
F.cross_entropy of the same head: the summed loss, dh and dW, at awkward sizes (rows, classes and hidden dims
that are not multiples of a tile, fewer than one tile, one class), with ignored rows, every row ignored and no
rows, in fp32 and 16-bit (fp16 under the interpreter, whose bf16 dots are wrong; bf16 too on a GPU); the row
splits of the dW kernel; and linear_cross_entropy taking them (TILED_MAX_DIM)
against its torch backend. Without CUDA the kernels run under TRITON_INTERPRET=1 with 16 x 16 tiles, so these
sizes cross several tiles both ways; gpu tests run the compiled kernels at MQAR's shape."""

import pytest
import torch
import torch.nn.functional as F
from triton_setup import device_or_skip

HAS_CUDA = torch.cuda.is_available()

DEVICE = device_or_skip()

from rebased.ops import cross_entropy  # noqa: E402
from rebased.ops.cross_entropy import linear_cross_entropy  # noqa: E402
from rebased.ops.triton import head_loss  # noqa: E402
from rebased.ops.triton.head_loss import TileLaunch, head_loss_tiles, row_splits  # noqa: E402
from rebased.ops.triton.launch import DEFAULT_SMS  # noqa: E402
from rebased.testing import assert_close  # noqa: E402

IGNORE = -100


def head_inputs(rows, vocab, dim, ignored=0.3, seed=0, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=g) * scale
    weight = torch.randn(vocab, dim, generator=g) * scale
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[torch.rand(rows, generator=g) < ignored] = IGNORE
    return hidden.to(DEVICE, dtype), weight.to(DEVICE, dtype), targets.to(DEVICE)


def reference(hidden, weight, targets, ignore_index=IGNORE):
    """(loss, dh, dW) in float64 from the same (upcast) inputs."""
    h = hidden.double().requires_grad_(True)
    w = weight.double().requires_grad_(True)
    loss = F.cross_entropy(h @ w.T, targets, ignore_index=ignore_index, reduction="sum")
    dh, dw = torch.autograd.grad(loss, (h, w))
    return loss.detach(), dh, dw


@pytest.mark.parametrize(
    "rows, vocab, dim",
    [(1, 1, 3), (7, 5, 8), (16, 16, 16), (17, 33, 20), (50, 100, 64), (40, 37, 1), (33, 70, 130)],
)
@pytest.mark.parametrize("ignored", [0.0, 0.3])
def test_float32_matches_float64(rows, vocab, dim, ignored):
    hidden, weight, targets = head_inputs(rows, vocab, dim, ignored, seed=rows + vocab)
    loss, dh, dw = head_loss_tiles(hidden, weight, targets, IGNORE, need_dh=True, need_dw=True)
    want_loss, want_dh, want_dw = reference(hidden, weight, targets)
    assert loss.dtype == dw.dtype == torch.float32 and dh.dtype == hidden.dtype
    assert_close(loss, want_loss, rel_rms=1e-6, atol=1e-5, name="loss")
    assert_close(dh, want_dh, rel_rms=1e-5, atol=1e-6, name="dh")
    assert_close(dw, want_dw, rel_rms=1e-5, atol=1e-6, name="dW")


def test_large_logits_keep_their_precision():
    """Logits of a few hundred (an online max that moves between tiles, and exponentials that would overflow
    without it)."""
    hidden, weight, targets = head_inputs(30, 70, 32, seed=3, scale=4.0)
    loss, dh, dw = head_loss_tiles(hidden, weight, targets, IGNORE, need_dh=True, need_dw=True)
    want_loss, want_dh, want_dw = reference(hidden, weight, targets)
    assert_close(loss, want_loss, rel_rms=1e-6, name="loss")
    assert_close(dh, want_dh, rel_rms=1e-5, name="dh")
    assert_close(dw, want_dw, rel_rms=1e-5, name="dW")


HALF = [torch.float16] + [torch.bfloat16] * HAS_CUDA


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_within_a_rounding(dtype):
    """16-bit h and W: the dots exact in fp32, p rounded to 16 bits for the gradient dots (as dlogits are)."""
    hidden, weight, targets = head_inputs(48, 90, 64, seed=4, dtype=dtype)
    loss, dh, dw = head_loss_tiles(hidden, weight, targets, IGNORE, need_dh=True, need_dw=True)
    want_loss, want_dh, want_dw = reference(hidden, weight, targets)
    assert dh.dtype == dtype and dw.dtype == torch.float32
    assert_close(loss, want_loss, rel_rms=1e-5, name="loss")
    assert_close(dh, want_dh, rel_rms=1e-2, name="dh")
    assert_close(dw, want_dw, rel_rms=1e-2, name="dW")


def test_every_row_ignored_and_no_rows():
    hidden, weight, targets = head_inputs(20, 30, 8, ignored=1.0)
    loss, dh, dw = head_loss_tiles(hidden, weight, targets, IGNORE, need_dh=True, need_dw=True)
    assert loss.item() == 0 and not dh.any() and not dw.any()
    loss, dh, dw = head_loss_tiles(hidden[:0], weight, targets[:0], IGNORE, need_dh=True, need_dw=True)
    assert loss.item() == 0 and dh.shape == (0, 8) and dw.shape == (30, 8) and not dw.any()


def test_other_ignore_index_and_partial_gradients():
    hidden, weight, targets = head_inputs(25, 40, 12, ignored=0.0, seed=5)
    targets[::3] = 7  # class 7 ignored: its rows count for nothing, the other rows' class-7 logits still do
    want_loss, want_dh, want_dw = reference(hidden, weight, targets, ignore_index=7)
    loss, dh, dw = head_loss_tiles(hidden, weight, targets, 7, need_dh=True, need_dw=False)
    assert dw is None
    assert_close(loss, want_loss, rel_rms=1e-6, name="loss")
    assert_close(dh, want_dh, rel_rms=1e-5, name="dh")
    loss, dh, dw = head_loss_tiles(hidden, weight, targets, 7, need_dh=False, need_dw=True)
    assert dh is None
    assert_close(dw, want_dw, rel_rms=1e-5, name="dW")
    loss, dh, dw = head_loss_tiles(hidden, weight, targets, 7, need_dh=False, need_dw=False)
    assert dh is None and dw is None
    assert_close(loss, want_loss, rel_rms=1e-6, name="loss only")


@pytest.mark.parametrize("bad", [40, -1])
def test_out_of_range_target_gives_nan(bad):
    hidden, weight, targets = head_inputs(6, 40, 8, ignored=0.0)
    targets[2] = bad
    loss, _, _ = head_loss_tiles(hidden, weight, targets, IGNORE, need_dh=True, need_dw=True)
    assert torch.isnan(loss)


@pytest.mark.parametrize("rows", [1, 15, 16, 17, 1000, 262_144])
@pytest.mark.parametrize("vocab", [5, 8192])
def test_row_splits_cover_every_row_once(rows, vocab):
    launch = TileLaunch(64, 128, 8)
    splits, split_rows = row_splits(rows, vocab, launch, torch.device("cpu"))
    assert split_rows % launch.rows == 0 and splits >= 1
    assert (splits - 1) * split_rows < rows <= splits * split_rows  # none empty, all covered
    if rows >= 262_144 and vocab == 8192:  # MQAR at L 2048: 64 class tiles, split until ~4 programs an SM
        assert splits * 64 >= head_loss.PROGRAMS_PER_SM * DEFAULT_SMS


@pytest.mark.parametrize("autocast", [None, *HALF], ids=str)
def test_linear_cross_entropy_takes_the_tiles(autocast, monkeypatch):
    """Through linear_cross_entropy(backend="triton") with TILED_MAX_DIM open: the tile kernels run, and loss
    and both gradients match the torch backend (under autocast to 16 bits too)."""
    monkeypatch.setattr(cross_entropy, "TILED_MAX_DIM", 64)
    calls = []
    monkeypatch.setattr(head_loss, "head_loss_tiles", lambda *a, **k: calls.append(1) or head_loss_tiles(*a, **k))
    hidden, weight, targets = head_inputs(45, 60, 24, seed=6)
    results = {}
    for backend in ("triton", "torch"):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        with torch.autocast(DEVICE, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = linear_cross_entropy(h, w, targets, chunk_rows=16, backend=backend)
        loss.backward()
        results[backend] = (loss.detach(), h.grad, w.grad)
    assert calls == [1]
    # 16 bits: the torch path rounds the logits to 16 bits first, the tiles do not
    rel = {"loss": 1e-5, "grad": 1e-5} if autocast is None else {"loss": 1e-3, "grad": 1e-2}
    for name, got, want in zip(("loss", "grad hidden", "grad weight"), results["triton"], results["torch"]):
        assert got.dtype == want.dtype
        assert_close(got, want, rel_rms=rel[name.split()[0]], name=name)


def test_wider_heads_keep_the_row_kernel(monkeypatch):
    monkeypatch.setattr(cross_entropy, "TILED_MAX_DIM", 16)
    monkeypatch.setattr(head_loss, "head_loss_tiles", lambda *a, **k: pytest.fail("tiles for a wide head"))
    hidden, weight, targets = head_inputs(10, 20, 17)
    linear_cross_entropy(hidden.requires_grad_(True), weight, targets, backend="triton").backward()


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(hidden=torch.zeros(4)), ValueError, "hidden must be a 2-D tensor"),
        (dict(hidden=torch.zeros(4, 3, dtype=torch.float64)), ValueError, "float32, bfloat16 or float16"),
        (dict(weight=torch.zeros(5, 3, dtype=torch.bfloat16)), ValueError, "share a dtype"),
        (dict(weight=torch.zeros(5, 4)), ValueError, "hidden's D = 3"),
        (dict(hidden=torch.zeros(4, 300), weight=torch.zeros(5, 300)), NotImplementedError, "D up to 256"),
        (dict(weight=torch.zeros(0, 3)), ValueError, "at least one class"),
        (dict(targets=torch.zeros(4, dtype=torch.int32)), ValueError, "targets must be int64"),
        (dict(targets=torch.zeros(5, dtype=torch.int64)), ValueError, "targets must be int64 of shape"),
    ],
)
def test_bad_inputs(change, error, message):
    inputs = dict(hidden=torch.zeros(4, 3), weight=torch.zeros(5, 3), targets=torch.zeros(4, dtype=torch.int64))
    inputs.update(change)
    inputs = {name: t.to(DEVICE) for name, t in inputs.items()}
    with pytest.raises(error, match=message):
        head_loss_tiles(inputs["hidden"], inputs["weight"], inputs["targets"], IGNORE, need_dh=True, need_dw=True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dim", [64, 128])
def test_gpu_mqar_shape_matches_the_row_kernel(dim):
    """MQAR at L 2048 (262,144 labelled rows, V 8192) in bf16: the compiled tile kernels against the chunked
    logits with the row kernel, and the loss against float64 from the same bf16 inputs."""
    hidden, weight, targets = head_inputs(262_144, 8192, dim, ignored=0.05, seed=9, dtype=torch.bfloat16, scale=0.3)
    loss, dh, dw = head_loss_tiles(hidden, weight, targets, IGNORE, need_dh=True, need_dw=True)
    want = cross_entropy._chunked(hidden, weight, targets, IGNORE, 4096, True, True, fused=True)
    assert_close(loss, want[0], rel_rms=1e-4, name="loss")
    assert_close(dh, want[1], rel_rms=2e-2, name="dh")
    assert_close(dw, want[2], rel_rms=2e-2, name="dW")
    exact = F.cross_entropy(hidden.double() @ weight.double().T, targets, ignore_index=IGNORE, reduction="sum")
    assert_close(loss, exact, rel_rms=1e-5, name="loss against float64")


def test_compiled_launches_by_head_width(monkeypatch):
    monkeypatch.setattr(head_loss, "interpreting", lambda: False)
    assert head_loss.launches(64) == head_loss.GPU_LAUNCHES
    assert head_loss.launches(128) == head_loss.GPU_LAUNCHES_WIDE
