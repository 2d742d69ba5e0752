"""The Triton version guard (rebased.ops.triton.versions): backend="auto" runs the fused kernels only on a Triton
version the GPU tests passed on, and torch elsewhere with one warning; an explicit backend="triton" runs them
with one warning. On the CPU: the installed version is faked through triton.__version__, a GPU's compiled run
by switching off the guard's interpreter exemption, and CUDA tensors by a CPU tensor that says it is one."""

import importlib
import os
import warnings

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the import of rebased.ops.triton

triton = pytest.importorskip("triton")

import rebased.ops as ops  # noqa: E402
from rebased.ops import IMPLEMENTATIONS, Polynomial, layer_norm, linear_attention  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)

versions = importlib.import_module("rebased.ops.triton.versions")
fused_norm = importlib.import_module("rebased.ops.triton.layer_norm")
VERIFIED = sorted(versions.VERIFIED_TRITON)[-1] + ".0"
UNVERIFIED = "3.0.0"


class SaysCuda(torch.Tensor):
    """A tensor whose is_cuda is True wherever it lives: what backend="auto" decides by."""

    @property
    def is_cuda(self):
        return True


def cuda_looking(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(DEVICE).as_subclass(SaysCuda)


@pytest.fixture
def compiled(monkeypatch):
    """As on a GPU: the guard applies (no interpreter exemption, no trust variable), no warning given yet."""
    monkeypatch.setattr(versions, "interpreting", lambda: False)
    monkeypatch.setattr(versions, "WARNED", set())
    monkeypatch.delenv(versions.TRUST_VARIABLE, raising=False)


def guard_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, versions.UnverifiedTritonWarning)]


def test_installed_version_is_major_minor(monkeypatch):
    for full, short in (("3.6.0", "3.6"), ("3.10.1+git3f2a", "3.10"), ("4.0", "4.0")):
        monkeypatch.setattr(triton, "__version__", full)
        assert versions.installed_version() == short
    assert all(key.count(".") == 1 for key in versions.VERIFIED_TRITON)


def test_auto_runs_torch_on_an_unverified_triton_with_one_warning(compiled, monkeypatch):
    monkeypatch.setattr(triton, "__version__", UNVERIFIED)
    q = cuda_looking(1, 300, 1, 4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert ops.resolve_backend("chunk", "auto", q) is IMPLEMENTATIONS[("chunk", "torch")]
        assert ops.resolve_backend("parallel", "auto", q) is IMPLEMENTATIONS[("parallel", "torch")]
        assert ops.pick_mode(q, "auto", None) == "chunk"  # torch's crossover (256), not triton's (4096)
        o, _ = linear_attention(q, q, q, mode="auto", kernel=Polynomial.rebased(4))
    assert len(guard_warnings(record)) == 1
    assert "backend='auto' runs torch" in guard_warnings(record)[0] and UNVERIFIED in guard_warnings(record)[0]
    expected, _ = linear_attention(*(x.as_subclass(torch.Tensor) for x in (q, q, q)), mode="chunk", backend="torch",
                                   kernel=Polynomial.rebased(4))  # fmt: skip
    assert torch.equal(o.as_subclass(torch.Tensor), expected)


def test_auto_runs_triton_on_a_verified_version_or_when_trusted(compiled, monkeypatch):
    q = cuda_looking(1, 300, 1, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", versions.UnverifiedTritonWarning)
        monkeypatch.setattr(triton, "__version__", VERIFIED)
        assert ops.resolve_backend("chunk", "auto", q) is IMPLEMENTATIONS[("chunk", "triton")]
        assert ops.pick_mode(q, "auto", None) == "parallel"  # triton's crossover
        monkeypatch.setattr(triton, "__version__", UNVERIFIED)
        monkeypatch.setenv(versions.TRUST_VARIABLE, "1")
        assert ops.resolve_backend("parallel", "auto", q) is IMPLEMENTATIONS[("parallel", "triton")]


def test_explicit_triton_runs_on_an_unverified_version_with_one_warning(compiled, monkeypatch):
    """The fused kernels run, with one warning for CUDA tensors; none for CPU ones (the compiled kernels
    refuse those, and the interpreter is exempt)."""
    monkeypatch.setattr(triton, "__version__", UNVERIFIED)
    calls = []

    def fused(q, k, v, **options):  # the registered pair, on plain tensors (the kernels read their memory)
        calls.append(1)
        return chunk_pair(*(x.as_subclass(torch.Tensor) for x in (q, k, v)), **options)

    chunk_pair = IMPLEMENTATIONS[("chunk", "triton")]
    monkeypatch.setitem(IMPLEMENTATIONS, ("chunk", "triton"), fused)
    q = cuda_looking(1, 5, 1, 4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            o, _ = linear_attention(q, q, q, mode="chunk", backend="triton", kernel=Polynomial.rebased(4))
    assert calls == [1, 1]
    assert len(guard_warnings(record)) == 1 and "backend='triton' runs the kernels anyway" in guard_warnings(record)[0]
    expected, _ = linear_attention(*(x.as_subclass(torch.Tensor) for x in (q, q, q)), mode="chunk", backend="torch",
                                   kernel=Polynomial.rebased(4))  # fmt: skip
    torch.testing.assert_close(o, expected)
    if not HAS_CUDA:
        with warnings.catch_warnings():
            warnings.simplefilter("error", versions.UnverifiedTritonWarning)
            monkeypatch.setattr(versions, "WARNED", set())
            plain = q.as_subclass(torch.Tensor)
            linear_attention(plain, plain, plain, mode="chunk", backend="triton", kernel=Polynomial.rebased(4))


def test_layer_norm_auto_follows_the_guard(compiled, monkeypatch):
    """Unverified: auto runs F.layer_norm (the fused op is not called) with one warning, an explicit triton the
    fused op with one warning; verified: auto runs the fused op, silently."""
    calls = []
    monkeypatch.setattr(fused_norm, "fused_layer_norm", lambda x, *args: calls.append(1) or x)
    x = cuda_looking(3, 8)
    monkeypatch.setattr(triton, "__version__", UNVERIFIED)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            y = layer_norm(x, None, None, 1e-5)
            assert torch.allclose(y, torch.nn.functional.layer_norm(x, (8,), eps=1e-5))
        assert calls == []
        layer_norm(x, None, None, 1e-5, backend="triton")
        assert calls == [1]
    found = guard_warnings(record)
    assert len(found) == 2 and "backend='auto' runs torch" in found[0] and "anyway" in found[1]
    monkeypatch.setattr(triton, "__version__", VERIFIED)
    with warnings.catch_warnings():
        warnings.simplefilter("error", versions.UnverifiedTritonWarning)
        assert layer_norm(x, None, None, 1e-5) is x and calls == [1, 1]


def test_the_interpreter_is_trusted_on_any_version(monkeypatch):
    monkeypatch.setattr(triton, "__version__", UNVERIFIED)
    monkeypatch.setattr(versions, "interpreting", lambda: True)
    monkeypatch.delenv(versions.TRUST_VARIABLE, raising=False)
    assert versions.trusted()
