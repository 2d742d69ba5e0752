"""rebased.ops.cross_entropy.linear_cross_entropy against F.cross_entropy(hidden @ weight.T, reduction="sum"): the
loss and both gradients, in float64 at awkward sizes and every kind of chunking, in float32, under CPU bf16
autocast (against the unfused form the training loop runs under the same autocast), with ignored rows, a scaled
loss, a weight tied to an embedding, without gradients, and for malformed inputs."""

import pytest
import torch
import torch.nn.functional as F

from rebased.ops.cross_entropy import CHUNK_LOGITS_ELEMENTS, default_chunk_rows, linear_cross_entropy
from rebased.testing import assert_close

IGNORE = -100


def inputs(rows, vocab, dim, dtype=torch.float64, ignored=0.0, seed=0):
    """hidden [rows, dim], weight [vocab, dim] (leaves needing grad), targets [rows] with about `ignored` of them
    set to IGNORE."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g) / dim**0.25).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[torch.rand(rows, generator=g) < ignored] = IGNORE
    return hidden, weight, targets


def reference(hidden, weight, targets, ignore_index=IGNORE):
    return F.cross_entropy(hidden @ weight.T, targets, reduction="sum", ignore_index=ignore_index)


def loss_and_grads(loss_fn, hidden, weight, scale=1.0):
    """loss_fn() and the gradients of scale * loss for hidden and weight."""
    loss = loss_fn()
    grad_hidden, grad_weight = torch.autograd.grad(loss * scale, (hidden, weight))
    return loss.detach(), grad_hidden, grad_weight


def check_against_reference(hidden, weight, targets, *, rel, scale=1.0, **options):
    ignore_index = options.get("ignore_index", IGNORE)
    got = loss_and_grads(lambda: linear_cross_entropy(hidden, weight, targets, **options), hidden, weight, scale)
    want = loss_and_grads(lambda: reference(hidden, weight, targets, ignore_index), hidden, weight, scale)
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), got, want):
        assert a.dtype == b.dtype, name
        assert_close(a, b, rel_rms=rel, atol=rel, name=name)


@pytest.mark.parametrize("rows, vocab, dim", [(1, 3, 5), (37, 11, 5), (64, 3, 1), (5, 97, 16)])
@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 64, 1000, None])
def test_float64_matches_reference(rows, vocab, dim, chunk_rows):
    hidden, weight, targets = inputs(rows, vocab, dim)
    check_against_reference(hidden, weight, targets, rel=1e-10, chunk_rows=chunk_rows)


@pytest.mark.parametrize("ignored", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("chunk_rows", [1, 6, None])
def test_ignored_rows(ignored, chunk_rows):
    hidden, weight, targets = inputs(37, 13, 6, ignored=ignored, seed=1)
    assert (targets == IGNORE).any() == (ignored > 0)
    check_against_reference(hidden, weight, targets, rel=1e-10, chunk_rows=chunk_rows)


def test_all_rows_ignored_gives_zero_not_nan():
    hidden, weight, targets = inputs(9, 5, 4, ignored=1.0)
    loss, grad_hidden, grad_weight = loss_and_grads(
        lambda: linear_cross_entropy(hidden, weight, targets, chunk_rows=4), hidden, weight
    )
    assert loss.item() == 0.0
    assert not grad_hidden.any() and not grad_weight.any()


def test_other_ignore_index():
    hidden, weight, targets = inputs(20, 7, 3, seed=2)
    targets[::3] = 5  # a valid class index used as the ignore marker
    check_against_reference(hidden, weight, targets, rel=1e-10, ignore_index=5, chunk_rows=3)


def test_no_rows():
    hidden, weight, targets = inputs(0, 7, 4)
    loss, grad_hidden, grad_weight = loss_and_grads(
        lambda: linear_cross_entropy(hidden, weight, targets), hidden, weight
    )
    assert loss.shape == () and loss.item() == 0.0
    assert grad_hidden.shape == (0, 4) and grad_weight.shape == (7, 4) and not grad_weight.any()


@pytest.mark.parametrize("scale", [3.0, 1 / 123, -0.5])
def test_incoming_gradient_scales(scale):
    """(3 * loss).backward(), and loss / count as the training loop does."""
    hidden, weight, targets = inputs(23, 9, 5, ignored=0.2, seed=3)
    check_against_reference(hidden, weight, targets, rel=1e-10, scale=scale, chunk_rows=5)


def test_backward_through_loss_divided_by_count():
    hidden, weight, targets = inputs(23, 9, 5, ignored=0.2, seed=4)
    count = int((targets != IGNORE).sum())
    (linear_cross_entropy(hidden, weight, targets, chunk_rows=4) / count).backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (reference(hidden, weight, targets) / count).backward()
    assert_close(got[0], hidden.grad, rel_rms=1e-10, name="grad hidden")
    assert_close(got[1], weight.grad, rel_rms=1e-10, name="grad weight")


def test_retained_graph_backward_twice():
    """The saved gradients are not scaled in place: a second backward of a retained graph gives the same."""
    hidden, weight, targets = inputs(11, 6, 3, seed=5)
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=4)
    first = torch.autograd.grad(2 * loss, (hidden, weight), retain_graph=True)
    second = torch.autograd.grad(2 * loss, (hidden, weight))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("chunk_rows", [7, None])
def test_float32_matches_reference(chunk_rows):
    hidden, weight, targets = inputs(200, 300, 32, dtype=torch.float32, ignored=0.1, seed=6)
    check_against_reference(hidden, weight, targets, rel=1e-5, chunk_rows=chunk_rows)


def test_non_contiguous_hidden():
    base, weight, targets = inputs(16, 9, 10, seed=7)
    weight = weight[:, :5].detach().requires_grad_()
    hidden = base[:, ::2]  # stride 2 along D
    check_against_reference(hidden, weight, targets, rel=1e-10, chunk_rows=5)


def test_mixed_dtypes_promote_and_grads_keep_each_dtype():
    hidden, weight, targets = inputs(12, 7, 4, seed=8)
    hidden32 = hidden.detach().float().requires_grad_()
    loss, grad_hidden, grad_weight = loss_and_grads(
        lambda: linear_cross_entropy(hidden32, weight, targets, chunk_rows=5), hidden32, weight
    )
    assert loss.dtype == torch.float64 and grad_hidden.dtype == torch.float32 and grad_weight.dtype == torch.float64
    _, want_hidden, want_weight = loss_and_grads(
        lambda: reference(hidden32.double(), weight, targets), hidden32, weight
    )
    assert_close(grad_hidden, want_hidden.float(), rel_rms=1e-6, name="grad hidden")
    assert_close(grad_weight, want_weight, rel_rms=1e-10, name="grad weight")


def autocast_case(chunk_rows, param_dtype=torch.float32):
    """(ours, the loop's unfused form, the same in fp32 without autocast): (loss, grad hidden, grad weight)
    each, everything run under CPU bf16 autocast but the last."""
    hidden, weight, targets = inputs(256, 300, 32, dtype=param_dtype, ignored=0.1, seed=9)
    with torch.no_grad():
        weight.mul_(3)  # logits of a few units: bf16 rounds them visibly (fp32 differs from the autocast result)
    count = int((targets != IGNORE).sum())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = loss_and_grads(
            lambda: linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows), hidden, weight, 1 / count
        )
        loop = loss_and_grads(
            lambda: F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum"),
            hidden,
            weight,
            1 / count,
        )
    full = loss_and_grads(lambda: reference(hidden.double(), weight.double(), targets), hidden, weight, 1 / count)
    return ours, loop, full


@pytest.mark.parametrize("chunk_rows", [1, 48, None])
def test_bf16_autocast_matches_the_unfused_form(chunk_rows):
    ours, loop, full = autocast_case(chunk_rows)
    assert ours[0].dtype == torch.float32
    assert ours[1].dtype == ours[2].dtype == torch.float32  # fp32 parameters get fp32 gradients
    # The logits are the same bf16 numbers in both; only the order of summation differs.
    assert_close(ours[0], loop[0], rel_rms=1e-6, name="loss")
    # The matmuls really ran in bf16: fp32/fp64 logits give a loss much further from the autocast one.
    assert abs(full[0].item() - loop[0].item()) > 20 * abs(ours[0].item() - loop[0].item())
    # Gradients: bf16 rounds dlogits and the products in a different order (per chunk): a bf16 tolerance.
    for name, a, b in zip(("grad hidden", "grad weight"), ours[1:], loop[1:]):
        assert_close(a, b, rel_rms=1e-2, name=name)


def test_bf16_inputs_without_autocast():
    hidden, weight, targets = inputs(64, 50, 16, dtype=torch.bfloat16, seed=10)
    ours = loss_and_grads(lambda: linear_cross_entropy(hidden, weight, targets, chunk_rows=9), hidden, weight)
    loop = loss_and_grads(
        lambda: F.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum"), hidden, weight
    )
    assert ours[0].dtype == torch.float32 and ours[1].dtype == ours[2].dtype == torch.bfloat16
    assert_close(ours[0], loop[0], rel_rms=1e-6, name="loss")
    for name, a, b in zip(("grad hidden", "grad weight"), ours[1:], loop[1:]):
        assert_close(a.float(), b.float(), rel_rms=2e-2, name=name)


def test_float64_under_autocast_stays_float64():
    """Autocast leaves fp64 alone, in the unfused form and here."""
    hidden, weight, targets = inputs(10, 7, 4, seed=11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        check_against_reference(hidden, weight, targets, rel=1e-10, chunk_rows=3)


def test_tied_weight():
    """The output weight is also the embedding: autograd sums the two gradients of the same Parameter."""
    g = torch.Generator().manual_seed(12)
    vocab, dim, rows = 17, 6, 30
    embedding = torch.nn.Embedding(vocab, dim).double()
    tokens = torch.randint(0, vocab, (rows,), generator=g)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64, requires_grad=True)

    def run(loss_fn):
        hidden = torch.tanh(embedding(tokens) @ mix)
        loss = loss_fn(hidden, embedding.weight, targets)
        return loss_and_grads(lambda: loss, embedding.weight, mix)

    got = run(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_rows=7))
    want = run(reference)
    for name, a, b in zip(("loss", "grad weight", "grad mix"), got, want):
        assert_close(a, b, rel_rms=1e-10, name=name)


def test_no_grad_saves_nothing():
    hidden, weight, targets = inputs(12, 7, 4, seed=13)
    want = reference(hidden, weight, targets).detach()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=5)
    assert loss.grad_fn is None and not loss.requires_grad
    assert_close(loss, want, rel_rms=1e-10, name="loss")
    loss = linear_cross_entropy(hidden.detach(), weight.detach(), targets, chunk_rows=5)
    assert loss.grad_fn is None and not loss.requires_grad
    assert_close(loss, want, rel_rms=1e-10, name="loss")


def test_grad_for_one_input_only():
    hidden, weight, targets = inputs(12, 7, 4, seed=14)
    frozen = weight.detach()
    (grad_hidden,) = torch.autograd.grad(linear_cross_entropy(hidden, frozen, targets, chunk_rows=5), hidden)
    (want,) = torch.autograd.grad(reference(hidden, frozen, targets), hidden)
    assert_close(grad_hidden, want, rel_rms=1e-10, name="grad hidden")


@pytest.mark.parametrize("create_graph", [False, True])
def test_double_backward_is_refused(create_graph):
    """A gradient penalty would silently miss the second-order term through constant gradients: refused."""
    hidden, weight, targets = inputs(8, 5, 3, seed=15)
    loss = linear_cross_entropy(hidden, weight, targets)
    if not create_graph:
        torch.autograd.grad(loss, hidden)
        return
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(loss, hidden, create_graph=True)


def test_default_chunk_rows():
    assert default_chunk_rows(8192) * 8192 == CHUNK_LOGITS_ELEMENTS  # MQAR's vocabulary: 4096 rows
    assert default_chunk_rows(50277) == CHUNK_LOGITS_ELEMENTS // 50277
    assert default_chunk_rows(2 * CHUNK_LOGITS_ELEMENTS) == 1


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(hidden=torch.zeros(4)), "hidden must have rank 2"),
        (dict(hidden=torch.zeros(1, 4, 3)), "hidden must have rank 2"),
        (dict(hidden=torch.zeros(4, 3, dtype=torch.int64)), "hidden must be a floating-point"),
        (dict(weight=torch.zeros(7)), "weight must have rank 2"),
        (dict(weight=torch.zeros(7, 2)), "hidden's D = 3"),
        (dict(targets=torch.zeros(4, dtype=torch.int32)), "targets must be a 1-D int64"),
        (dict(targets=torch.zeros(4, 1, dtype=torch.int64)), "targets must be a 1-D int64"),
        (dict(targets=[0, 1, 2, 3]), "targets must be a 1-D int64"),
        (dict(targets=torch.zeros(5, dtype=torch.int64)), "targets has 5 entries, hidden has 4 rows"),
        (dict(targets=torch.tensor([0, 1, 7, 2])), r"targets must be in \[0, 7\) or ignore_index=-100, got 7"),
        (dict(targets=torch.tensor([0, -1, 2, 3])), r"got -1"),
        (dict(targets=torch.tensor([0, -100, 2, 3]), ignore_index=-1), r"got -100"),
        (dict(chunk_rows=0), "chunk_rows must be an int >= 1"),
        (dict(chunk_rows=2.0), "chunk_rows must be an int >= 1"),
        (dict(chunk_rows=True), "chunk_rows must be an int >= 1"),
    ],
)
def test_bad_inputs(change, message):
    arguments = dict(hidden=torch.zeros(4, 3), weight=torch.zeros(7, 3), targets=torch.tensor([0, 1, IGNORE, 6]))
    arguments.update(change)
    hidden, weight, targets = arguments.pop("hidden"), arguments.pop("weight"), arguments.pop("targets")
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(hidden, weight, targets, **arguments)
