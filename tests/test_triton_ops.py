"""The Triton kernels against the float64 reference: outputs, final states, every gradient, the decode step.

Without CUDA the same kernels run on CPU tensors under TRITON_INTERPRET=1 (set by tests/conftest.py, before the backend
is imported) at tiny shapes with fixed launch configs, so CI checks their logic. Tests marked gpu run
the compiled kernels at realistic shapes, in bf16 and fp32.
"""

import importlib

import pytest
import torch
from triton_setup import device_or_skip

HAS_CUDA = torch.cuda.is_available()

DEVICE = device_or_skip()

from triton.runtime.errors import OutOfResources  # noqa: E402

import rebased.ops.triton as triton_ops  # noqa: E402
from rebased.ops import (  # noqa: E402
    LinearAttentionState,
    Polynomial,
    linear_attention,
    linear_attention_reference,
    linear_attention_step,
)
from rebased.testing import assert_close, error_report, per_position_relative_error  # noqa: E402

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

KERNELS = {
    "rebased": lambda d: Polynomial.rebased(d),
    "taylor": lambda d: Polynomial.taylor(d),
    "linear": lambda d: Polynomial.linear(),
    "features": lambda d: None,  # q, k already feature-mapped: the linear kernel on dimension F
}


def make_inputs(shape, value_dim, kernel, generator, dtype):
    q, k = (torch.randn(*shape, generator=generator) for _ in range(2))
    if kernel is None:  # positive features, so the normaliser stays away from zero
        q, k = q.exp(), k.exp()
    v = torch.randn(*shape[:-1], value_dim, generator=generator)
    return [x.to(DEVICE, dtype) for x in (q, k, v)]


def prefix_state(batch, heads, head_dim, value_dim, kernel, generator):
    """A state a real prefix leaves (z consistent with kv), fp32 as the contract says."""
    q, k, v = make_inputs((batch, 9, heads, head_dim), value_dim, kernel, generator, torch.float64)
    _, state = linear_attention_reference(q, k, v, kernel=kernel, output_final_state=True)
    return LinearAttentionState(*(x.float() for x in state))


def run_both(q, k, v, state, kernel, generator, mode="chunk"):
    """Outputs, final state and gradients (of o, final kv, final k_sum, all weighted) for triton and reference."""
    normalize = kernel is None or kernel.non_negative
    leaves = [q, k, v] + (list(state) if state is not None else [])
    for x in leaves:
        x.requires_grad_(True)
    options = dict(kernel=kernel, initial_state=state, output_final_state=True, normalize=normalize)
    o, final = linear_attention(q, k, v, mode=mode, backend="triton", **options)
    assert o.dtype == v.dtype, f"o in {o.dtype}, v in {v.dtype}: the contract says o is in v's dtype"
    assert final.kv.dtype == final.k_sum.dtype == torch.float32, "the contract says states are fp32"
    ref_o, ref_final = linear_attention_reference(q, k, v, **options)
    w_o = torch.randn(o.shape, generator=generator).to(DEVICE)
    w_kv = torch.randn(final.kv.shape, generator=generator).to(DEVICE)
    w_z = torch.randn(final.k_sum.shape, generator=generator).to(DEVICE)

    def loss(o, final):
        return (o.double() * w_o).sum() + (final.kv.double() * w_kv).sum() + (final.k_sum.double() * w_z).sum()

    grads = torch.autograd.grad(loss(o, final), leaves)
    ref_grads = torch.autograd.grad(loss(ref_o, ref_final), leaves)
    return (o, final, grads), (ref_o, ref_final, ref_grads)


GRAD_NAMES = ("dq", "dk", "dv", "d kv0", "d k_sum0")


def check(got, want, rel_rms):
    (o, final, grads), (ref_o, ref_final, ref_grads) = got, want
    assert_close(o, ref_o, rel_rms=rel_rms, name="o")
    assert_close(final.kv, ref_final.kv, rel_rms=rel_rms, name="final kv")
    assert_close(final.k_sum, ref_final.k_sum, rel_rms=rel_rms, name="final k_sum")
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        # atol: at T = 1 without a state o = v, so dq is 0 up to rounding and a relative error means nothing
        assert_close(g, r, rel_rms=rel_rms, atol=rel_rms / 10, name=name)


# Tiny shapes: D = 4 and V = 3 exercise the padding of both. Under the interpreter the chunk kernels take
# chunks of 32 and 16 x 16 tiles: lengths below, at and across both, and three chunks. Two heads; two
# sequences in one case (a dense batch's second sequence starts from its own initial state slot), one
# elsewhere: the interpreter's time grows with the number of programs, and more sequences take no other path.
@pytest.mark.parametrize("kernel_name", KERNELS)
@pytest.mark.parametrize("length", [1, 17, 31, 32, 33, 70])
@pytest.mark.parametrize("with_state", [False, True], ids=["no_state", "state"])
def test_chunk_matches_reference(kernel_name, length, with_state):
    generator = torch.Generator().manual_seed(length * 11 + with_state)
    kernel = KERNELS[kernel_name](4)
    batch = 2 if length == 17 and with_state else 1
    q, k, v = make_inputs((batch, length, 2, 4), 3, kernel, generator, torch.float32)
    state = prefix_state(batch, 2, 4, 3, kernel, generator) if with_state else None
    if state is not None:
        state = LinearAttentionState(*(x.to(DEVICE) for x in state))
    check(*run_both(q, k, v, state, kernel, generator), rel_rms=1e-5)


def test_chunk_long_walks():
    """20 chunks: the scans walk 21 slots, three unrolled groups with a carry between them, both ways. The walk
    is the same for every feature block, so q, k come feature-mapped (one block: the square blocks would add
    interpreter time, not paths)."""
    generator = torch.Generator().manual_seed(20)
    kernel = None
    q, k, v = make_inputs((1, 20 * 32, 1, 4), 3, kernel, generator, torch.float32)
    state = LinearAttentionState(*(x.to(DEVICE) for x in prefix_state(1, 1, 4, 3, kernel, generator)))
    check(*run_both(q, k, v, state, kernel, generator), rel_rms=1e-5)


@pytest.mark.parametrize(("head_dim", "value_dim", "heads"), [(16, 40, 1), (12, 20, 2), (32, 20, 1), (12, 1, 1)])
@pytest.mark.parametrize("kernel_name", ["rebased", "taylor"])
def test_chunk_wide_heads(head_dim, value_dim, heads, kernel_name):
    """q/k dim 32 with a square term too (32 square blocks), 12 (four zero padding blocks; with two heads, rows
    of H D = 24), value dims that are not powers of two."""
    generator = torch.Generator().manual_seed(head_dim * 3 + value_dim)
    kernel = KERNELS[kernel_name](head_dim)
    q, k, v = make_inputs((1, 40, heads, head_dim), value_dim, kernel, generator, torch.float32)
    state = prefix_state(1, heads, head_dim, value_dim, kernel, generator)
    state = LinearAttentionState(*(x.to(DEVICE) for x in state))
    check(*run_both(q, k, v, state, kernel, generator), rel_rms=1e-5)


@pytest.mark.parametrize("selectors", [False, True], ids=["tiles3d", "selectors"])
@pytest.mark.parametrize(("head_dim", "features"), [(16, 128), (32, 128), (16, 64)])
def test_chunk_grouped_square_blocks(head_dim, features, selectors, monkeypatch):
    """The 16-bit inputs' path, several square blocks per dot (G = features / BD), which fp32 inputs (these
    tests') do not take on their own: 8, 4 and 4 blocks a dot here, so one to four groups a state; built as
    [rows, G, BD] tiles or from selector dots (GroupTiles.selectors)."""
    CS = triton_ops.chunk_states
    grouped = CS.GroupLaunch(features // head_dim, selectors, 4)
    monkeypatch.setattr(CS, "tile_launch", lambda name, layout, dtype: grouped)
    generator = torch.Generator().manual_seed(head_dim + features)
    kernel = Polynomial.taylor(head_dim)
    q, k, v = make_inputs((1, 40, 1, head_dim), 5, kernel, generator, torch.float32)
    state = LinearAttentionState(*(x.to(DEVICE) for x in prefix_state(1, 1, head_dim, 5, kernel, generator)))
    check(*run_both(q, k, v, state, kernel, generator), rel_rms=1e-5)


def test_chunk_packed_with_initial_states():
    """cu_seqlens with an initial state per sequence (an empty one included): each sequence's output, final
    state and every gradient (its initial state's too) as the reference gives them for it alone."""
    from rebased.ops.triton.chunk_states import packed_chunk_states_linear_attention

    generator = torch.Generator().manual_seed(31)
    kernel = Polynomial.taylor(4)
    lengths = [33, 0, 5]
    cu = torch.tensor([0, 33, 33, 38])
    q, k, v = make_inputs((1, sum(lengths), 1, 4), 3, kernel, generator, torch.float32)
    state = LinearAttentionState(*(x.to(DEVICE) for x in prefix_state(3, 1, 4, 3, kernel, generator)))
    leaves = [q, k, v, *state]
    for x in leaves:
        x.requires_grad_(True)
    options = dict(kernel=kernel, output_final_state=True, normalize=True, eps=1e-12, chunk_size=64)
    o, final = packed_chunk_states_linear_attention(q, k, v, cu, initial_state=state, **options)
    w = torch.randn(o.shape, generator=generator).to(DEVICE)
    grads = torch.autograd.grad((o.double() * w).sum() + final.kv.double().sum(), leaves)
    outs, kvs = [], []
    for n, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        initial = LinearAttentionState(state.kv[n : n + 1], state.k_sum[n : n + 1])
        if a == b:  # nothing out; the final state is the initial one
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


def test_chunk_refuses_what_it_does_not_cover():
    from rebased.ops.triton.chunk_states import chunk_states_linear_attention

    options = dict(kernel=Polynomial.rebased(4), initial_state=None, output_final_state=False, normalize=True,
                   eps=1e-12, chunk_size=64)  # fmt: skip
    wide = torch.zeros(1, 3, 1, 129, device=DEVICE)
    with pytest.raises(NotImplementedError, match="dims up to 128"):
        chunk_states_linear_attention(wide, wide, wide, **options)
    many = torch.zeros(1, 1, 65536, 4, device=DEVICE)
    with pytest.raises(NotImplementedError, match="65535 heads"):
        chunk_states_linear_attention(many, many, many, **options)


# The parallel kernels tile 16 x 16 under the interpreter: lengths below, at and across the blocks (two
# sequences at the longest, as for the chunk kernels).
@pytest.mark.parametrize("kernel_name", KERNELS)
@pytest.mark.parametrize("length", [1, 15, 16, 17, 50])
def test_parallel_matches_reference(kernel_name, length):
    generator = torch.Generator().manual_seed(length * 7)
    kernel = KERNELS[kernel_name](4)
    q, k, v = make_inputs((2 if length == 50 else 1, length, 2, 4), 3, kernel, generator, torch.float32)
    check(*run_both(q, k, v, None, kernel, generator, mode="parallel"), rel_rms=1e-5)


@pytest.mark.parametrize(("head_dim", "value_dim", "heads"), [(16, 40, 1), (12, 20, 3), (32, 17, 1)])
@pytest.mark.parametrize("kernel_name", ["rebased", "taylor"])
def test_parallel_wide_heads(head_dim, value_dim, heads, kernel_name):
    """q/k dim 32 with a square term too: the parallel tiles never hold the D^2 features."""
    generator = torch.Generator().manual_seed(head_dim * value_dim)
    kernel = KERNELS[kernel_name](head_dim)
    q, k, v = make_inputs((1, 37, heads, head_dim), value_dim, kernel, generator, torch.float32)
    check(*run_both(q, k, v, None, kernel, generator, mode="parallel"), rel_rms=1e-5)


@pytest.mark.parametrize(("block_m", "block_n"), [(32, 16), (16, 32)])
def test_parallel_rectangular_tiles(block_m, block_n, monkeypatch):
    """Query and key blocks of different sizes: the causal walks must start and stop at the right tiles."""
    cfg = triton_ops.parallel.TileConfig(block_m, block_n)
    monkeypatch.setattr(triton_ops.parallel, "launch_configs", lambda: (cfg, cfg, cfg))
    generator = torch.Generator().manual_seed(block_m + 3 * block_n)
    kernel = Polynomial.taylor(4)
    q, k, v = make_inputs((1, 75, 2, 4), 5, kernel, generator, torch.float32)
    check(*run_both(q, k, v, None, kernel, generator, mode="parallel"), rel_rms=1e-5)


class RefusingKernel:
    """A Triton kernel stand-in: launches whose options `refuse` rejects raise OutOfResources, as Triton does
    when a compiled kernel needs more shared memory than the GPU has (before it runs); the rest run the real
    kernel. The interpreter never runs out of shared memory, so this is how CI reaches the step-down."""

    def __init__(self, kernel, refuse, launches):
        self.kernel, self.refuse, self.launches = kernel, refuse, launches

    def __getitem__(self, grid):
        def launch(*args, **options):
            self.launches.append(options)
            if self.refuse(options):
                raise OutOfResources(300_000, 232_448, "shared memory")
            return self.kernel[grid](*args, **options)

        return launch


def test_launch_fitting_steps_down_remembers_and_raises_when_nothing_fits(monkeypatch):
    launch = importlib.import_module("rebased.ops.triton.launch")
    monkeypatch.setattr(launch, "FITTED_RUNGS", {})
    tried = []

    def run(rung):
        tried.append(rung)
        if rung > 2:
            raise OutOfResources(300_000, 232_448, "shared memory")

    launch.launch_fitting("test", [8, 4, 2, 1], run, dims=(16, 64))
    assert tried == [8, 4, 2]
    tried.clear()
    launch.launch_fitting("test", [8, 4, 2, 1], run, dims=(16, 64))  # the rung found is remembered for the key
    assert tried == [2]
    tried.clear()
    launch.launch_fitting("test", [8, 4, 2, 1], run, dims=(32, 64))  # another compile: tried from the top
    assert tried == [8, 4, 2]
    with pytest.raises(OutOfResources):
        launch.launch_fitting("test", [16, 8], run)


def test_chunk_steps_down_to_fewer_square_blocks_per_dot(monkeypatch):
    """Tiled chunk kernels refused above 2 square blocks a dot (as q/k 32 at 256 features is on the H200)
    launch at G = 2, and the result is still the reference's; the states' layout does not depend on G."""
    CS = triton_ops.chunk_states
    monkeypatch.setattr(CS, "tile_launch", lambda name, layout, dtype: CS.GroupLaunch(8, True, 4))
    monkeypatch.setattr(importlib.import_module("rebased.ops.triton.launch"), "FITTED_RUNGS", {})
    launches = []
    for name in ("chunk_sums_kernel", "output_kernel", "dkdv_kernel", "dq_kernel"):
        kernel = RefusingKernel(getattr(CS, name), lambda options: options["G"] > 2, launches)
        monkeypatch.setattr(CS, name, kernel)
    generator = torch.Generator().manual_seed(32)
    kernel = Polynomial.taylor(16)
    q, k, v = make_inputs((1, 40, 1, 16), 5, kernel, generator, torch.float32)
    state = LinearAttentionState(*(x.to(DEVICE) for x in prefix_state(1, 1, 16, 5, kernel, generator)))
    check(*run_both(q, k, v, state, kernel, generator), rel_rms=1e-5)
    assert [options["G"] for options in launches] == [8, 4, 2, 8, 4, 2, 8, 4, 2, 8, 4, 2, 8, 4, 2]
    assert all(options["SEL"] for options in launches)


def test_parallel_steps_down_to_fewer_stages_then_smaller_tiles(monkeypatch):
    """Parallel kernels refused at more than one pipeline stage and at 64-row tiles fall to 32 x 32 tiles
    (and the block tables follow): the result is still the reference's."""
    parallel = triton_ops.parallel
    cfg = parallel.TileConfig(64, 64, num_stages=2)
    monkeypatch.setattr(parallel, "launch_configs", lambda: (cfg, cfg, cfg))
    monkeypatch.setattr(importlib.import_module("rebased.ops.triton.launch"), "FITTED_RUNGS", {})
    launches = []
    for name in ("parallel_fwd_kernel", "parallel_dkdv_kernel", "parallel_dq_kernel"):
        refuse = lambda options: options["BM"] > 32 or options["num_stages"] > 1  # noqa: E731
        monkeypatch.setattr(parallel, name, RefusingKernel(getattr(parallel, name), refuse, launches))
    generator = torch.Generator().manual_seed(75)
    kernel = Polynomial.taylor(4)
    q, k, v = make_inputs((1, 75, 2, 4), 5, kernel, generator, torch.float32)
    check(*run_both(q, k, v, None, kernel, generator, mode="parallel"), rel_rms=1e-5)
    rungs = [(options["BM"], options["BN"], options["num_stages"]) for options in launches]
    assert rungs == [(64, 64, 2), (64, 64, 1), (32, 32, 1)] * 3


def test_program_tables_list_every_block_in_launch_order():
    """Rows (start, length, block index[, first slot]): sequence by sequence, or by block index, longest walks
    first for query blocks and ascending for key blocks; an empty sequence has no rows. A dense batch is the
    packed batch of B sequences of T, row for row."""
    sequences = importlib.import_module("rebased.ops.triton.sequences")
    starts, lengths = torch.tensor([0, 17, 17]), torch.tensor([17, 0, 40])
    rows = [[0, 17, 0], [0, 17, 1], [17, 40, 0], [17, 40, 1], [17, 40, 2]]
    assert sequences.program_table(starts, lengths, 16).tolist() == rows
    longest = [[17, 40, 2], [0, 17, 1], [17, 40, 1], [0, 17, 0], [17, 40, 0]]
    assert sequences.program_table(starts, lengths, 16, longest_first=True).tolist() == longest
    shortest = [[0, 17, 0], [17, 40, 0], [0, 17, 1], [17, 40, 1], [17, 40, 2]]
    assert sequences.program_table(starts, lengths, 16, longest_first=False).tolist() == shortest
    slots = sequences.program_table(starts, lengths, 32, first_slots=torch.tensor([0, 2, 3])).tolist()
    assert slots == [[0, 17, 0, 0], [17, 40, 0, 3], [17, 40, 1, 3]]
    dense = sequences.Sequences(batch=3, length=50)
    packed = sequences.Sequences(cu_seqlens=torch.tensor([0, 50, 100, 150], dtype=torch.int32))
    block_table = triton_ops.parallel.block_table
    assert torch.equal(block_table(dense, 16, True, "cpu"), block_table(packed, 16, True, "cpu"))
    assert block_table(dense, 16, True, "cpu") is block_table(dense, 16, True, "cpu")  # built once per shape


def test_parallel_without_normalisation():
    generator = torch.Generator().manual_seed(8)
    kernel = Polynomial.rebased(4)
    q, k, v = make_inputs((1, 33, 2, 4), 5, kernel, generator, torch.float32)
    for x in (q, k, v):
        x.requires_grad_(True)
    o, _ = linear_attention(q, k, v, mode="parallel", backend="triton", kernel=kernel, normalize=False)
    ref_o, _ = linear_attention_reference(q, k, v, kernel=kernel, normalize=False)
    assert_close(o, ref_o, rel_rms=1e-5, name="o")
    grads = torch.autograd.grad(o.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref_o.square().sum(), (q, k, v))
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(g, r, rel_rms=1e-5, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_parallel_inference_writes_the_same_output(dtype):
    """Under no_grad the forward writes o alone (no fp32 copy for a backward): the same values as training's,
    and the reference's. (fp16: the interpreter's bf16 dots are wrong.)"""
    generator = torch.Generator().manual_seed(11)
    kernel = Polynomial.rebased(4)
    q, k, v = make_inputs((2, 40, 2, 4), 6, kernel, generator, dtype)
    options = dict(mode="parallel", backend="triton", kernel=kernel)
    with torch.no_grad():
        inferred, _ = linear_attention(q, k, v, **options)
    trained, _ = linear_attention(*(x.clone().requires_grad_(True) for x in (q, k, v)), **options)
    assert trained.requires_grad and not inferred.requires_grad
    assert inferred.dtype == dtype and torch.equal(inferred, trained.detach())
    ref_o, _ = linear_attention_reference(q, k, v, kernel=kernel)
    assert_close(inferred, ref_o, rel_rms=1e-5 if dtype == torch.float32 else 1e-2, name="o")


@pytest.mark.parametrize("mode", ["chunk", "parallel"])
def test_16bit_inputs(mode):
    """16-bit inputs: o in their dtype (the backward reads an fp32 copy), states fp32, everything within 1% of
    float64. The chunk kernels launch as on the GPU for 16-bit inputs (TILE_CONFIGS: several square blocks a
    dot, chunk_sums in the 3D form, the rest from selector dots). fp16, as the interpreter's bf16 dots are
    wrong (Triton 3.9); the GPU tests run bf16."""
    generator = torch.Generator().manual_seed(16)
    kernel = Polynomial.rebased(4)
    q, k, v = make_inputs((1, 40, 1, 4), 3, kernel, generator, torch.float16)
    state = None
    if mode == "chunk":
        state = LinearAttentionState(*(x.to(DEVICE) for x in prefix_state(1, 1, 4, 3, kernel, generator)))
    check(*run_both(q, k, v, state, kernel, generator, mode=mode), rel_rms=1e-2)


@pytest.mark.parametrize("mode", ["chunk", "parallel"])
def test_packed_sequences_through_the_fused_kernels(mode, monkeypatch):
    """cu_seqlens: the chunk and parallel kernels walk the offsets in one launch; both equal the reference on
    each sequence alone (outputs, final states, gradients)."""
    from rebased.ops import VARLEN_IMPLEMENTATIONS

    native = VARLEN_IMPLEMENTATIONS[(mode, "triton")]
    calls = []  # count the packed launches, to know the offsets were walked in one call
    monkeypatch.setitem(VARLEN_IMPLEMENTATIONS, (mode, "triton"), lambda *a, **kw: calls.append(1) or native(*a, **kw))
    generator = torch.Generator().manual_seed(21)
    kernel = Polynomial.rebased(4)
    lengths = [17, 0, 40, 3]
    q, k, v = make_inputs((1, sum(lengths), 2, 4), 3, kernel, generator, torch.float32)
    for x in (q, k, v):
        x.requires_grad_(True)
    cu = torch.tensor([0, 17, 17, 57, 60], dtype=torch.int32)
    o, final = linear_attention(q, k, v, mode=mode, backend="triton", kernel=kernel, output_final_state=True,
                                cu_seqlens=cu)  # fmt: skip
    assert calls == [1]
    w = torch.randn(o.shape, generator=generator)
    grads = torch.autograd.grad((o * w).sum() + final.kv.sum(), (q, k, v))
    ref_outputs, ref_kv = [], []
    for start, end in zip(cu.tolist(), cu.tolist()[1:]):
        if end == start:  # the reference takes no empty sequence: nothing out, a zero state
            ref_outputs.append(v[:, start:end])
            ref_kv.append(torch.zeros(1, 2, 16, 3))
            continue
        ref_o, ref_final = linear_attention_reference(
            q[:, start:end], k[:, start:end], v[:, start:end], kernel=kernel, output_final_state=True
        )
        ref_outputs.append(ref_o)
        ref_kv.append(ref_final.kv)
    ref_o, ref_kv = torch.cat(ref_outputs, 1), torch.cat(ref_kv)
    ref_grads = torch.autograd.grad((ref_o * w).sum() + ref_kv.sum(), (q, k, v))
    assert_close(o, ref_o, rel_rms=1e-5, name="o")
    assert_close(final.kv, ref_kv, rel_rms=1e-5, name="kv")
    assert final.kv[1].abs().max() == 0  # the empty sequence
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(g, r, rel_rms=1e-5, name=name)


def test_chunk_without_final_state_or_grads_of_it():
    generator = torch.Generator().manual_seed(3)
    kernel = Polynomial.rebased(4)
    q, k, v = make_inputs((1, 40, 1, 4), 8, kernel, generator, torch.float32)
    o, final = linear_attention(q, k, v, mode="chunk", backend="triton", kernel=kernel)
    assert final is None
    ref_o, _ = linear_attention_reference(q, k, v, kernel=kernel)
    assert_close(o, ref_o, rel_rms=1e-5, name="o")


def test_auto_backend_uses_triton_only_on_cuda():
    from rebased.ops import IMPLEMENTATIONS, resolve_backend

    q = torch.zeros(1, 1, 1, 4, device=DEVICE)
    expected = ("chunk", "triton") if HAS_CUDA else ("chunk", "torch")
    assert resolve_backend("chunk", "auto", q) is IMPLEMENTATIONS[expected]


def test_unsupported_inputs_raise():
    q = torch.randn(1, 5, 1, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(NotImplementedError, match="float64"):
        linear_attention(q, q, q, mode="chunk", backend="triton", kernel=Polynomial.rebased(4))
    wide = torch.randn(1, 5, 1, 129, device=DEVICE)
    with pytest.raises(NotImplementedError, match="up to 128"):
        linear_attention(wide, wide, wide, mode="chunk", backend="triton", kernel=Polynomial.rebased(129))
    state = LinearAttentionState(torch.zeros(1, 1, 16, 4, device=DEVICE), torch.zeros(1, 1, 16, device=DEVICE))
    small = torch.randn(1, 5, 1, 4, device=DEVICE)
    with pytest.raises(NotImplementedError, match="initial state"):
        linear_attention(small, small, small, mode="parallel", backend="triton", kernel=Polynomial.rebased(4),
                         initial_state=state)  # fmt: skip
    huge = torch.randn(1, 5, 1, 129, device=DEVICE)
    with pytest.raises(NotImplementedError, match="up to 128"):
        linear_attention(huge, huge, huge, mode="parallel", backend="triton")


@pytest.mark.parametrize("kernel_name", ["rebased", "taylor", "features"])
@pytest.mark.parametrize(("head_dim", "value_dim"), [(4, 3), (16, 40), (32, 20)])
def test_step_updates_state_in_place(kernel_name, head_dim, value_dim):
    """Several in-place steps equal the torch step, which the reference tests bind to the full forward."""
    generator = torch.Generator().manual_seed(head_dim)
    kernel = KERNELS[kernel_name](head_dim)
    normalize = kernel is None or kernel.non_negative
    state = prefix_state(3, 2, head_dim, value_dim, kernel, generator)
    state = LinearAttentionState(*(x.to(DEVICE).contiguous() for x in state))
    ref_state = LinearAttentionState(*(x.double() for x in state))
    kv_storage = state.kv.data_ptr()
    for _ in range(3):
        q, k, v = (x[:, 0] for x in make_inputs((3, 1, 2, head_dim), value_dim, kernel, generator, torch.float32))
        o = triton_ops.step_(q, k, v, state, kernel=kernel, normalize=normalize)
        ref_o, ref_state = linear_attention_step(
            q.double(), k.double(), v.double(), ref_state, kernel=kernel, normalize=normalize
        )
        assert_close(o, ref_o, rel_rms=1e-5, name="o")
        assert_close(state.kv, ref_state.kv, rel_rms=1e-6, name="kv")
        assert_close(state.k_sum, ref_state.k_sum, rel_rms=1e-6, name="k_sum")
    assert state.kv.data_ptr() == kv_storage


def test_linear_attention_step_triton_backend_updates_in_place():
    generator = torch.Generator().manual_seed(9)
    kernel = Polynomial.taylor(4)
    state = LinearAttentionState(*(x.to(DEVICE) for x in prefix_state(2, 2, 4, 5, kernel, generator)))
    start = LinearAttentionState(state.kv.clone(), state.k_sum.clone())
    q, k, v = (x[:, 0] for x in make_inputs((2, 1, 2, 4), 5, kernel, generator, torch.float32))
    o, same = linear_attention_step(q, k, v, state, kernel=kernel, backend="triton")
    ref_o, ref_state = linear_attention_step(q, k, v, start, kernel=kernel)
    assert same.kv is state.kv and same.k_sum is state.k_sum
    assert_close(o, ref_o, rel_rms=1e-5, name="o")
    assert_close(state.kv, ref_state.kv, rel_rms=1e-6, name="kv")
    with pytest.raises(ValueError, match="contiguous float32"):
        linear_attention_step(q, k, v, (start.kv.double(), start.k_sum.double()), kernel=kernel, backend="triton")


# ---- GPU: compiled kernels at realistic shapes -------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("kernel_name", ["rebased", "taylor"])
@pytest.mark.parametrize("length", [1000, 4097])
@pytest.mark.parametrize("mode", ["chunk", "parallel"])
def test_gpu_against_float64(dtype, kernel_name, length, mode):
    """bf16: every gradient within 1% relative RMS of float64 at every position; fp32: 1e-4 overall.
    The chunk kernels start from a state; the parallel kernel takes none."""
    check_gpu_against_float64(KERNELS[kernel_name](16), (2, length, 4, 16), 64, dtype, mode, seed=length)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(("head_dim", "value_dim"), [(32, 64), (16, 32), (16, 128), (32, 128)])
@pytest.mark.parametrize("mode", ["chunk", "parallel"])
def test_gpu_head_and_value_dims(dtype, head_dim, value_dim, mode):
    """The dims the kernels promise beyond the suite's 16 / 64: q/k 32 (ReBased's 1024 features, the
    16-bit chunk path then groups 32-wide square blocks) and value dims 32 and 128."""
    shape = (1, 777, 4, head_dim)
    check_gpu_against_float64(Polynomial.rebased(head_dim), shape, value_dim, dtype, mode, seed=head_dim + value_dim)


def check_gpu_against_float64(kernel, shape, value_dim, dtype, mode, seed):
    """The GPU tests' bound: bf16 every gradient within 1% relative RMS of float64 at every position, fp32
    1e-4 overall; the chunk kernels start from a state."""
    generator = torch.Generator().manual_seed(seed)
    batch, _, heads, head_dim = shape
    q, k, v = make_inputs(shape, value_dim, kernel, generator, dtype)
    state = None
    if mode == "chunk":
        state = prefix_state(batch, heads, head_dim, value_dim, kernel, generator)
        state = LinearAttentionState(*(x.to(DEVICE) for x in state))
    got, want = run_both(q, k, v, state, kernel, generator, mode=mode)
    if dtype == torch.float32:
        check(got, want, rel_rms=1e-4)
        return
    check(got, want, rel_rms=1e-2)
    for name, g, r in zip(GRAD_NAMES[:3], got[2], want[2]):
        worst = per_position_relative_error(g, r).max().item()
        assert worst <= 1e-2, f"{name}: worst per-position rel-RMS {worst:.3e} (error {error_report(g, r)})"


@gpu
@needs_cuda
@pytest.mark.parametrize("value_dim", [1, 2, 5, 8, 16, 21])
@pytest.mark.parametrize("mode", ["chunk", "parallel"])
def test_gpu_small_value_dims(value_dim, mode):
    """The MQAR models' value dims (d_model // 12: 1 at the ablation's d_model 16, 5 at 64): block_v 16 with
    8 warps once crashed the chunk forward."""
    generator = torch.Generator().manual_seed(value_dim)
    kernel = Polynomial.rebased(16)
    q, k, v = make_inputs((64, 130, 12, 16), value_dim, kernel, generator, torch.float32)
    check(*run_both(q, k, v, None, kernel, generator, mode=mode), rel_rms=1e-4)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("mode", ["parallel", "chunk"])
def test_gpu_packed_parallel_against_float64(dtype, mode):
    """cu_seqlens through the parallel (or chunk) kernels' offset walk: each sequence as if alone
    (float64 oracle)."""
    generator = torch.Generator().manual_seed(7)
    kernel = Polynomial.rebased(16)
    lengths = [1000, 1, 0, 3000, 513]
    q, k, v = make_inputs((1, sum(lengths), 4, 16), 64, kernel, generator, dtype)
    for x in (q, k, v):
        x.requires_grad_(True)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    o, _ = linear_attention(q, k, v, mode=mode, backend="triton", kernel=kernel, cu_seqlens=cu)
    w = torch.randn(o.shape, generator=generator).to(DEVICE)
    grads = torch.autograd.grad((o.double() * w).sum(), (q, k, v))
    ref = torch.cat([
        linear_attention_reference(q[:, a:b], k[:, a:b], v[:, a:b], kernel=kernel)[0] if b > a else v[:, a:b].double()
        for a, b in zip(cu.tolist(), cu.tolist()[1:])
    ], dim=1)  # fmt: skip
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    assert_close(o, ref, rel_rms=tolerance, name="o")
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(g, r, rel_rms=tolerance, name=name)


@gpu
@needs_cuda
@pytest.mark.parametrize(("head_dim", "value_dim"), [(16, 64), (32, 128)])
def test_gpu_step_matches_chunk_final_state(head_dim, value_dim):
    """The decode step continues the chunk kernel's final state: q/k 16 (the suite's) and 32 (1024 features,
    the step's limit with a square term) at v 128."""
    generator = torch.Generator().manual_seed(5)
    kernel = Polynomial.rebased(head_dim)
    q, k, v = make_inputs((64, 33, 16, head_dim), value_dim, kernel, generator, torch.bfloat16)
    _, final = linear_attention(q[:, :32], k[:, :32], v[:, :32], mode="chunk", kernel=kernel, output_final_state=True)
    state = LinearAttentionState(final.kv.contiguous(), final.k_sum.contiguous())
    o = triton_ops.step_(q[:, 32], k[:, 32], v[:, 32], state, kernel=kernel)
    ref_o, ref_final = linear_attention_reference(q, k, v, kernel=kernel, output_final_state=True)
    assert_close(o, ref_o[:, 32], rel_rms=1e-2, name="o")
    # bf16 inputs: the chunk kernel's state dots run in tf32 (2^-11 relative per term), measured 3.5e-4
    assert_close(state.kv, ref_final.kv, rel_rms=1e-3, name="kv")


@pytest.mark.parametrize("clamp", [False, True])
@pytest.mark.parametrize("value_dim", [1, 5, 40])
def test_parallel_row_terms_kernel_matches_its_torch_twin(clamp, value_dim):
    """r = 1 / (den + eps) and dd = -(do . o) per query row, over rows that do not fill the last block, with
    negative normalisers (a clamped kernel's den can round below zero: r uses 0 there, dd is 0)."""
    parallel = triton_ops.parallel
    generator = torch.Generator().manual_seed(value_dim)
    tokens, heads = 13, 3
    do = torch.randn(tokens, heads, value_dim, generator=generator).to(DEVICE, torch.bfloat16)
    o = torch.randn(tokens, heads, value_dim, generator=generator).to(DEVICE)
    den = torch.randn(tokens, heads, generator=generator).to(DEVICE)
    want = parallel.row_terms_torch(do, o, den, clamp, True, 1e-6)
    got = parallel.row_terms_fused(do, o, den, clamp, 1e-6)
    for name, g, w in zip(("r", "dd"), got, want):
        assert_close(g, w, rel_rms=1e-6, name=name)
    assert clamp == bool((got[1][den < 0] == 0).all())
