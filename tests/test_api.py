"""The public boundary: clear errors on bad input, a quiet fast import, the CLI's main job."""

import subprocess
import sys

import pytest
import torch

import rebased
from rebased import ops
from rebased.cli import main
from rebased.ops import Polynomial, linear_attention, linear_attention_step


def qkv(batch=2, length=5, heads=3, dim=4, value_dim=6):
    return (
        torch.randn(batch, length, heads, dim),
        torch.randn(batch, length, heads, dim),
        torch.randn(batch, length, heads, value_dim),
    )


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda q, k, v: (q[0], k, v), "q must have rank 4"),
        (lambda q, k, v: (q, k[:, :, :2], v), "q and k must have the same shape"),
        (lambda q, k, v: (q, k, v[:1]), "v must match q"),
        (lambda q, k, v: (q, k, v[:, :4]), "v must match q"),
        (lambda q, k, v: (q.long(), k, v), "q must be a floating-point tensor"),
        (lambda q, k, v: (q, k, v.int()), "v must be a floating-point tensor"),
        (lambda q, k, v: (q, k.numpy(), v), "k must be a torch.Tensor"),
        (lambda q, k, v: (q[:, :0], k[:, :0], v[:, :0]), "T must be >= 1"),
    ],
)
def test_malformed_tensors_raise_value_error_naming_the_argument(mutate, message):
    with pytest.raises(ValueError, match=message):
        linear_attention(*mutate(*qkv()))


def test_bad_state_mode_backend_and_options():
    q, k, v = qkv()
    kernel = Polynomial.rebased(4)
    good_state = (torch.zeros(2, 3, 16, 6), torch.zeros(2, 3, 16))
    linear_attention(q, k, v, kernel=kernel, initial_state=good_state)
    with pytest.raises(ValueError, match=r"initial_state.kv must have shape \(2, 3, 16, 6\)"):
        linear_attention(q, k, v, kernel=kernel, initial_state=(torch.zeros(2, 3, 4, 6), torch.zeros(2, 3, 16)))
    with pytest.raises(ValueError, match="initial_state.k_sum must have shape"):
        linear_attention(q, k, v, kernel=kernel, initial_state=(good_state[0], torch.zeros(2, 3, 15)))
    with pytest.raises(ValueError, match="initial_state must be a"):
        linear_attention(q, k, v, kernel=kernel, initial_state=good_state[0])
    with pytest.raises(ValueError, match="unknown mode 'chunked'.*did you mean 'chunk'"):
        linear_attention(q, k, v, mode="chunked")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        linear_attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        linear_attention(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        linear_attention(q, k, v, eps=-1.0)
    with pytest.raises(ValueError, match="kernel must be a Polynomial"):
        linear_attention(q, k, v, kernel="rebased")


def test_polynomial_validates_its_coefficients():
    with pytest.raises(ValueError, match="c1 must be finite and >= 0"):
        Polynomial(c1=-1.0)
    with pytest.raises(ValueError, match="at least one non-zero"):
        Polynomial()
    with pytest.raises(ValueError, match="scale"):
        Polynomial(c2=1.0, scale=0.0)


def test_unimplemented_pair_raises_not_implemented_naming_it(monkeypatch):
    monkeypatch.delitem(ops.IMPLEMENTATIONS, ("recurrent", "torch"))
    with pytest.raises(NotImplementedError, match="mode='recurrent', backend='torch'"):
        linear_attention(*qkv(), mode="recurrent", backend="torch")


@pytest.mark.parametrize("mode", ops.MODES)
def test_triton_backend_on_cpu_tensors_never_falls_back_silently(mode, monkeypatch):
    """backend='triton' on CPU tensors without the interpreter: recurrent has no Triton pair and the fused
    kernels need CUDA, so every mode raises NotImplementedError naming the backend, and no torch
    implementation runs in its place."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def fell_back(*args, **kwargs):
        raise AssertionError("backend='triton' ran a torch implementation")

    for torch_mode in ops.MODES:
        monkeypatch.setitem(ops.IMPLEMENTATIONS, (torch_mode, "torch"), fell_back)
    with pytest.raises(NotImplementedError, match="backend='triton'"):
        linear_attention(*qkv(), mode=mode, backend="triton")


def test_step_validates_shapes():
    q, k, v = (x[:, 0] for x in qkv())
    o, state = linear_attention_step(q, k, v)
    assert o.shape == (2, 3, 6) and state.kv.shape == (2, 3, 4, 6)
    with pytest.raises(ValueError, match="q must have rank 3"):
        linear_attention_step(q[None], k, v)
    with pytest.raises(ValueError, match="initial_state.kv must have shape"):
        linear_attention_step(q, k, v, (torch.zeros(2, 3, 5, 6), torch.zeros(2, 3, 5)))


def test_public_api_names_exist():
    for name in rebased.__all__:
        assert hasattr(rebased, name), name
    for name in ops.__all__:
        assert hasattr(ops, name), name


def test_import_is_quiet_and_does_not_load_triton():
    code = "import sys, rebased; print(sorted(m for m in sys.modules if m.split('.')[0] == 'triton'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]" and result.stderr == ""


def test_cli_bench_runs_its_check_and_table(capsys):
    assert main(["bench", "--lengths", "32", "--repeats", "1", "--heads", "2"]) == 0
    out = capsys.readouterr().out
    assert "| parallel  | torch" in out and "| chunk     | torch" in out and "within" in out


def test_cli_reports_bad_arguments_as_errors(capsys):
    assert main(["bench", "--feature-map", "relu", "--lengths", "32"]) == 2
    assert "polynomial kernel" in capsys.readouterr().err


def test_auto_uses_torch_when_the_fused_kernel_refuses_the_inputs(monkeypatch):
    def refuses(*args, **kwargs):
        raise NotImplementedError("fake fused kernel: float64 not covered")

    q, k, v = qkv()
    expected, _ = linear_attention(q, k, v, backend="torch")
    monkeypatch.setattr(ops, "resolve_backend", lambda mode, backend, q: refuses)
    o, _ = linear_attention(q, k, v, backend="auto")
    assert torch.equal(o, expected)
    with pytest.raises(NotImplementedError, match="fake fused kernel"):
        linear_attention(q, k, v, backend="triton")


def test_auto_mode_takes_parallel_up_to_the_threshold_and_chunk_beyond(monkeypatch):
    limit = ops.PARALLEL_MAX_LENGTH["torch"]
    for length, expected in ((limit, "parallel"), (limit + 1, "chunk")):
        q, k, v = qkv(batch=1, length=length, heads=1)
        assert ops.pick_mode(q, "auto", None) == expected  # CPU tensors: the torch threshold
        picked = []

        def spy(*args, picked=picked, **kwargs):
            picked.append(1)
            return args[2], None

        monkeypatch.setitem(ops.IMPLEMENTATIONS, (expected, "torch"), spy)
        linear_attention(q, k, v, mode="auto", backend="torch", kernel=Polynomial.rebased(4))
        assert picked == [1]


def test_auto_mode_gives_the_same_numbers_as_the_mode_it_picks():
    q, k, v = qkv(length=40)
    kernel = Polynomial.rebased(4)
    o, state = linear_attention(q, k, v, mode="auto", kernel=kernel, output_final_state=True)
    ref, ref_state = linear_attention(q, k, v, mode="parallel", kernel=kernel, output_final_state=True)
    assert torch.equal(o, ref) and torch.equal(state.kv, ref_state.kv)


def test_auto_mode_falling_back_to_torch_takes_the_torch_crossover(monkeypatch):
    """A fused parallel kernel that refuses (a dim it does not cover, say) must not leave torch running the
    quadratic form at the fused kernel's longer crossover length."""

    def refuses(*args, **kwargs):
        raise NotImplementedError("fake fused kernel refuses")

    monkeypatch.setattr(ops, "pick_mode", lambda q, backend, state: "chunk" if backend == "torch" else "parallel")
    monkeypatch.setattr(ops, "resolve_backend", lambda mode, backend, q: refuses)
    ran = []
    monkeypatch.setitem(ops.IMPLEMENTATIONS, ("chunk", "torch"), lambda *a, **kw: ran.append("chunk") or (a[2], None))
    monkeypatch.setitem(
        ops.IMPLEMENTATIONS, ("parallel", "torch"), lambda *a, **kw: ran.append("parallel") or (a[2], None)
    )
    q, k, v = qkv(length=300)
    linear_attention(q, k, v, mode="auto", backend="auto")
    assert ran == ["chunk"]


def test_gpu_suite_module_imports_and_builds_its_entries_on_the_cpu():
    """The suite itself needs a GPU; this keeps its module importable and its entry table well-formed here."""
    from rebased.bench.gpu_suite import SuiteConfig, _suite_entries

    entries = _suite_entries(SuiteConfig(peers=False), Polynomial.rebased(16), True)
    assert set(entries) == set(SuiteConfig().entries)
    assert [quadratic for _, quadratic in entries.values()] == [False, False, False, True]  # parallel/torch only
