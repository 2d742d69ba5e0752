"""The embedding-gradient kernel (rebased.ops.triton.embedding.embedding_grad) against a float64 index_add of
the same rows: awkward sizes (positions, ids and dims off the tiles), one id taking most positions (MQAR's
filler token), ids at both ends of the vocabulary, no positions, several and one split, fp32 and 16-bit
gradients; the same bits on every call; and rebased.ops.embedding / Embedding through their backends, against
nn.Embedding. Without CUDA the kernel runs under TRITON_INTERPRET=1 with 16 x 16 tiles; gpu tests run the
compiled kernel at an MQAR micro-batch's shape."""

import pytest
import torch
from torch import nn
from triton_setup import device_or_skip, replayed

HAS_CUDA = torch.cuda.is_available()

DEVICE = device_or_skip()

from rebased.ops import embedding as ops_embedding  # noqa: E402
from rebased.ops.triton import embedding as kernel  # noqa: E402
from rebased.ops.triton import launch  # noqa: E402
from rebased.ops.triton.embedding import embedding_grad  # noqa: E402
from rebased.testing import assert_close  # noqa: E402


def grad_inputs(positions, vocab, dim, filler=0.0, seed=0, dtype=torch.float32):
    """ids [positions] uniform over the vocabulary, a share `filler` of them set to 0; dy [positions, dim]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (positions,), generator=g)
    ids[torch.rand(positions, generator=g) < filler] = 0
    dy = torch.randn(positions, dim, generator=g)
    return ids.to(DEVICE), dy.to(DEVICE, dtype)


def reference(ids, dy, vocab):
    return torch.zeros(vocab, dy.shape[-1], dtype=torch.float64, device=dy.device).index_add_(
        0, ids.reshape(-1), dy.reshape(-1, dy.shape[-1]).double()
    )


@pytest.mark.parametrize(
    "positions, vocab, dim, filler",
    [
        (1, 1, 1, 0.0),  # one position, one id
        (37, 50, 24, 0.0),  # everything off the 16 x 16 tiles
        (200, 33, 40, 0.6),  # one id with most positions: its rows spread over the splits
        (130, 300, 16, 0.25),  # more ids than positions: many empty blocks
        (64, 16, 64, 1.0),  # every position the same id
        (0, 20, 8, 0.0),  # no positions: zeros
    ],
)
def test_matches_float64_index_add(positions, vocab, dim, filler):
    ids, dy = grad_inputs(positions, vocab, dim, filler)
    got = embedding_grad(ids, dy, vocab)
    assert got.dtype == torch.float32 and got.shape == (vocab, dim)
    assert_close(got, reference(ids, dy, vocab), rel_rms=1e-6, atol=1e-5, name="dW")


def test_ids_at_both_ends_and_a_batch_shape():
    ids = torch.tensor([[0, 49, 49, 0, 25], [49, 0, 1, 48, 49]], device=DEVICE)
    dy = torch.randn(2, 5, 7, device=DEVICE)
    assert_close(embedding_grad(ids, dy, 50), reference(ids, dy, 50), rel_rms=1e-6, atol=1e-6, name="dW")


@pytest.mark.parametrize("splits", [1, 3, 16])
def test_any_number_of_splits(splits, monkeypatch):
    monkeypatch.setattr(kernel, "MAX_SPLITS", splits)
    ids, dy = grad_inputs(150, 40, 20, filler=0.5, seed=2)
    assert kernel.splits_for(40, 20) == splits
    assert_close(embedding_grad(ids, dy, 40), reference(ids, dy, 40), rel_rms=1e-6, atol=1e-5, name="dW")


def test_splits_shrink_for_large_tables():
    assert kernel.splits_for(8192, 64) == kernel.MAX_SPLITS  # MQAR: 16 x 8192 x 64 fp32 = 32 MB of parts
    assert kernel.splits_for(50304, 768) == 1  # an LM's table: rebased.ops.embedding keeps torch there


def test_same_bits_every_call():
    ids, dy = grad_inputs(300, 64, 32, filler=0.4, seed=3)
    first = embedding_grad(ids, dy, 64)
    assert torch.equal(first, embedding_grad(ids, dy, 64))


def test_sixteen_bit_gradients():
    ids, dy = grad_inputs(90, 30, 24, filler=0.3, seed=4, dtype=torch.float16)
    got = embedding_grad(ids, dy, 30)  # fp16 rows, summed in fp32
    assert_close(got, reference(ids, dy, 30), rel_rms=1e-6, atol=1e-4, name="dW")


@pytest.mark.parametrize(
    "ids, dy, vocab, error, message",
    [
        (torch.zeros(4, dtype=torch.int32), torch.zeros(4, 3), 5, ValueError, "ids must be an int64"),
        (torch.zeros(4, dtype=torch.int64), torch.zeros(5, 3), 5, ValueError, "dy must have shape"),
        (torch.zeros(4, dtype=torch.int64), torch.zeros(4, 3, dtype=torch.int64), 5, ValueError, "float tensor"),
        (torch.zeros(4, dtype=torch.int64), torch.zeros(4, 300), 5, NotImplementedError, "D up to 256"),
        (torch.zeros(4, dtype=torch.int64), torch.zeros(4, 3), 0, ValueError, "vocab must be >= 1"),
    ],
)
def test_bad_inputs(ids, dy, vocab, error, message):
    with pytest.raises(error, match=message):
        embedding_grad(ids.to(DEVICE), dy.to(DEVICE), vocab)


def test_embedding_backends_match_nn_embedding(monkeypatch):
    """Through rebased.ops.Embedding: "triton" runs the kernel and gives nn.Embedding's output and gradient;
    "auto" runs it only where EMBEDDING_TRITON_ON_GPU allows, on CUDA."""
    calls = []
    monkeypatch.setattr(kernel, "embedding_grad", lambda *a: calls.append(1) or embedding_grad(*a))
    monkeypatch.setattr(ops_embedding, "EMBEDDING_TRITON_ON_GPU", False)
    reference_module = nn.Embedding(40, 12).to(DEVICE)
    ids = grad_inputs(3 * 17, 40, 1, filler=0.5, seed=5)[0].reshape(3, 17)
    want = reference_module(ids)
    want.square().sum().backward()
    for backend in ("triton", "torch", "auto"):
        module = ops_embedding.Embedding(40, 12, backend=backend).to(DEVICE)
        module.load_state_dict(reference_module.state_dict())  # the same parameters and state dict
        got = module(ids)
        got.square().sum().backward()
        assert torch.equal(got, want)
        assert_close(module.weight.grad, reference_module.weight.grad, rel_rms=1e-6, atol=1e-6, name=backend)
    assert calls == [1]  # "auto": torch, with EMBEDDING_TRITON_ON_GPU off
    monkeypatch.setattr(ops_embedding, "EMBEDDING_TRITON_ON_GPU", True)
    takes = ops_embedding._kernel_takes  # imports the Triton module: only once triton is known to run here
    monkeypatch.setattr(ops_embedding, "_kernel_takes", lambda w: w.is_cuda and takes(w) or pytest.fail("on CPU"))
    ops_embedding.Embedding(40, 12, backend="auto")(ids.cpu()).sum().backward()  # CPU tensors: torch even so
    assert calls == [1]
    if HAS_CUDA:
        ops_embedding.Embedding(40, 12, backend="auto").to(DEVICE)(ids).sum().backward()
        assert calls == [1, 1]


def test_embedding_refuses_what_it_does_not_implement(monkeypatch):
    with pytest.raises(ValueError, match="does not take padding_idx"):
        ops_embedding.Embedding(10, 4, padding_idx=0)
    with pytest.raises(ValueError, match="unknown backend 'trition'"):
        ops_embedding.embedding(torch.zeros(2, dtype=torch.int64), torch.zeros(3, 4), backend="trition")
    monkeypatch.setattr(launch, "interpreting", lambda: False)  # CPU tensors, compiled: refused at the call
    with pytest.raises(NotImplementedError, match="needs CUDA tensors"):
        ops_embedding.embedding(torch.zeros(2, dtype=torch.int64), torch.zeros(3, 4, requires_grad=True),
                                backend="triton")  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_mqar_micro_batch():
    """128 sequences of L 2048 (262,144 positions, a quarter of them the filler id 0), V 8192, D 64, fp32: against
    float64 and against torch's own backward, and the same bits twice."""
    ids, dy = grad_inputs(262_144, 8192, 64, filler=0.25, seed=6)
    got = embedding_grad(ids, dy, 8192)
    assert_close(got, reference(ids, dy, 8192), rel_rms=1e-6, name="dW against float64")
    weight = torch.zeros(8192, 64, device=DEVICE, requires_grad=True)
    torch.nn.functional.embedding(ids, weight).backward(dy)
    assert_close(got, weight.grad, rel_rms=1e-6, name="dW against torch")
    assert torch.equal(got, embedding_grad(ids, dy, 8192))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_captured_in_a_cuda_graph():
    """The sort, the search and the kernel in one CUDA graph (as the graphed training step runs them): a replay
    on new ids and gradients gives what an eager call gives."""
    ids, dy = grad_inputs(4096, 512, 32, filler=0.25, seed=7)
    new_ids, new_dy = grad_inputs(4096, 512, 32, filler=0.5, seed=8)
    outputs, eager = replayed(lambda: embedding_grad(ids, dy, 512), (ids, dy), (new_ids, new_dy))
    assert torch.equal(outputs, eager)
