"""Variable-length batches (cu_seqlens): the packed call equals one call per sequence, in every mode, with
states, gradients and empty sequences; malformed offsets fail with a clear error."""

import pytest
import torch

from rebased import ops
from rebased.ops import MODES, LinearAttentionState, Polynomial, linear_attention, linear_attention_reference
from rebased.testing import assert_close

LENGTHS = [5, 0, 70, 1, 33]  # an empty one, one longer than a chunk, a single token


def packed_inputs(lengths, heads=2, dim=4, value_dim=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k = (torch.randn(1, total, heads, dim, generator=generator, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, total, heads, value_dim, generator=generator, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


def initial_states(count, heads, dim, value_dim, kernel, seed=1):
    """States a real prefix leaves, one per sequence."""
    generator = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(count, 6, heads, dim, generator=generator, dtype=torch.float64) for _ in range(2))
    v = torch.randn(count, 6, heads, value_dim, generator=generator, dtype=torch.float64)
    return linear_attention_reference(q, k, v, kernel=kernel, output_final_state=True)[1]


def per_sequence(q, k, v, cu, state, kernel):
    """The oracle: the float64 reference on each sequence alone (an empty one keeps its state)."""
    outputs, kvs, sums = [], [], []
    for i, (start, end) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        first = None if state is None else LinearAttentionState(state.kv[i : i + 1], state.k_sum[i : i + 1])
        if end == start:
            outputs.append(v[:, start:end])
            kvs.append(first.kv if first else torch.zeros(1, q.shape[2], 16, v.shape[-1], dtype=q.dtype))
            sums.append(first.k_sum if first else torch.zeros(1, q.shape[2], 16, dtype=q.dtype))
            continue
        o, final = linear_attention_reference(
            q[:, start:end], k[:, start:end], v[:, start:end], kernel=kernel, initial_state=first,
            output_final_state=True,
        )  # fmt: skip
        outputs.append(o)
        kvs.append(final.kv)
        sums.append(final.k_sum)
    return torch.cat(outputs, 1), LinearAttentionState(torch.cat(kvs), torch.cat(sums))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_state", [False, True], ids=["no_state", "state"])
def test_packed_call_equals_one_call_per_sequence(mode, with_state):
    kernel = Polynomial.rebased(4)
    q, k, v, cu = packed_inputs(LENGTHS)
    state = initial_states(len(LENGTHS), 2, 4, 3, kernel) if with_state else None
    leaves = [q, k, v] + (list(state) if state else [])
    for x in leaves:
        x.requires_grad_(True)
    o, final = linear_attention(
        q, k, v, mode=mode, kernel=kernel, initial_state=state, output_final_state=True, cu_seqlens=cu
    )
    ref_o, ref_final = per_sequence(q, k, v, cu, state, kernel)
    assert o.shape == v.shape and final.kv.shape == (len(LENGTHS), 2, 16, 3)
    for name, got, want in (("o", o, ref_o), ("kv", final.kv, ref_final.kv), ("k_sum", final.k_sum, ref_final.k_sum)):
        assert_close(got, want, rel_rms=1e-10, name=name)
    weights = [torch.randn(x.shape, dtype=torch.float64) for x in (o, final.kv, final.k_sum)]
    loss = lambda o, f: sum((x * w).sum() for x, w in zip((o, f.kv, f.k_sum), weights))  # noqa: E731
    grads = torch.autograd.grad(loss(o, final), leaves)
    ref_grads = torch.autograd.grad(loss(ref_o, ref_final), leaves)
    for name, g, r in zip(("dq", "dk", "dv", "d kv0", "d k_sum0"), grads, ref_grads):
        assert_close(g, r, rel_rms=1e-10, name=name)


@pytest.mark.parametrize(("limit", "expected"), [(70, "parallel"), (69, "chunk")])
def test_auto_mode_decides_by_the_longest_sequence(limit, expected, monkeypatch):
    """mode="auto" on a packed batch: parallel while the longest sequence (70) is within the threshold, even
    though the packed T (109) is beyond it; chunk beyond. Both give the per-sequence outputs."""
    ran = []
    real = ops.IMPLEMENTATIONS[(expected, "torch")]
    monkeypatch.setitem(ops.IMPLEMENTATIONS, (expected, "torch"), lambda *a, **kw: ran.append(1) or real(*a, **kw))
    monkeypatch.setitem(ops.PARALLEL_MAX_LENGTH, "torch", limit)
    kernel = Polynomial.rebased(4)
    q, k, v, cu = packed_inputs(LENGTHS)
    o, _ = linear_attention(q, k, v, mode="auto", kernel=kernel, cu_seqlens=cu)
    assert len(ran) == 4  # one call per non-empty sequence, all in the expected mode
    assert_close(o, per_sequence(q, k, v, cu, None, kernel)[0], rel_rms=1e-10, name=f"auto ({expected})")


def test_one_sequence_equals_the_plain_call():
    q, k, v, cu = packed_inputs([40])
    plain, _ = linear_attention(q, k, v, kernel=Polynomial.taylor(4))
    packed, _ = linear_attention(q, k, v, kernel=Polynomial.taylor(4), cu_seqlens=cu)
    assert torch.equal(plain, packed)


@pytest.mark.parametrize(
    ("offsets", "message"),
    [
        ([1, 5, 10], "from 0 to T"),
        ([0, 5, 9], "from 0 to T"),
        ([0, 6, 4, 10], "non-decreasing"),
        ([0.0, 10.0], "integer tensor"),
        ([0], "from 0 to T"),
    ],
)
def test_malformed_offsets_raise(offsets, message):
    q, k, v, _ = packed_inputs([10])
    with pytest.raises(ValueError, match=message):
        linear_attention(q, k, v, cu_seqlens=torch.tensor(offsets))


def test_packed_batch_must_be_one_and_states_must_have_a_row_per_sequence():
    q, k, v, cu = packed_inputs([4, 6])
    with pytest.raises(ValueError, match="B must be 1"):
        linear_attention(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), cu_seqlens=cu)
    kernel = Polynomial.rebased(4)
    three = initial_states(3, 2, 4, 3, kernel)
    with pytest.raises(ValueError, match="initial_state.kv must have shape"):
        linear_attention(q, k, v, kernel=kernel, initial_state=three, cu_seqlens=cu)
