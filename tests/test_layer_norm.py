"""The fused LayerNorm (rebased.ops.norm, backend "triton") against F.layer_norm in float64: outputs and the
gradients of x, weight and bias. Without CUDA the kernels run under TRITON_INTERPRET=1 at tiny shapes (4-row
tiles, 3 backward programs, so the partial sums and the strided row walk are exercised); gpu tests run the
compiled kernels at the MQAR feature map's shape."""

import dataclasses
import importlib

import pytest
import torch
import torch.nn.functional as F
from triton_setup import device_or_skip

HAS_CUDA = torch.cuda.is_available()

DEVICE = device_or_skip()

from rebased.ops.norm import LayerNorm, affine, layer_norm  # noqa: E402
from rebased.testing import assert_close  # noqa: E402


def inputs(rows, features, dtype, affine, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, features, generator=g) * 3 + 1).to(DEVICE, dtype)
    w = (torch.randn(features, generator=g) + 1).to(DEVICE) if affine[0] else None
    b = torch.randn(features, generator=g).to(DEVICE) if affine[1] else None
    dy = torch.randn(rows, features, generator=g).to(DEVICE)
    return x, w, b, dy


def both(x, w, b, dy, fused=None, reference=None):
    """(y, dx, dw, db) from the fused op and from its float64 reference (default: layer_norm's triton backend and
    F.layer_norm; each a function of x, w, b). Both get dy rounded to x's dtype, as autograd hands it to the fused
    backward (bf16 y: bf16 dy), so the comparison measures the kernel alone."""
    fused = fused or (lambda x, w, b: layer_norm(x, w, b, 1e-5, backend="triton"))
    reference = reference or (lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, 1e-5))
    dy = dy.to(x.dtype)
    results = []
    for op, precision in ((fused, None), (reference, torch.float64)):
        leaves = [t.detach().clone() if t is not None else None for t in (x, w, b)]
        if precision is not None:
            leaves = [t.to(precision) if t is not None else None for t in leaves]
        xl, wl, bl = [t.requires_grad_(True) if t is not None else None for t in leaves]
        y = op(xl, wl, bl)
        (y.double() * dy.double()).sum().backward()
        results.append((y, xl.grad, None if wl is None else wl.grad, None if bl is None else bl.grad))
    return results


@pytest.mark.parametrize("features", [5, 16, 100, 192])
@pytest.mark.parametrize("rows", [1, 7, 30])
@pytest.mark.parametrize("affine", [(True, True), (False, False), (True, False), (False, True)])
@pytest.mark.parametrize("tile_sums", [False, True], ids=["block-sums", "tile-sums"])
def test_fused_layer_norm_matches_float64(features, rows, affine, tile_sums, monkeypatch):
    """Both forms of the backward's gamma/beta sums (NormLaunch.tile_sums)."""
    fused = importlib.import_module("rebased.ops.triton.layer_norm")
    monkeypatch.setattr(fused, "BACKWARD_LAUNCH", dataclasses.replace(fused.BACKWARD_LAUNCH, tile_sums=tile_sums))
    x, w, b, dy = inputs(rows, features, torch.float32, affine, seed=features + rows)
    (y, dx, dw, db), (ry, rdx, rdw, rdb) = both(x, w, b, dy)
    assert y.dtype == torch.float32 and dx.dtype == torch.float32
    assert_close(y, ry, rel_rms=1e-5, name="y")
    assert_close(dx, rdx, rel_rms=1e-4, name="dx")
    for got, want, name in ((dw, rdw, "dweight"), (db, rdb, "dbias")):
        assert (got is None) == (want is None)
        if got is not None:
            assert got.dtype == torch.float32
            assert_close(got, want, rel_rms=1e-5, name=name)


def test_bf16_input_keeps_its_dtype_and_autocast_picks_the_output_dtype():
    x, w, b, dy = inputs(9, 48, torch.bfloat16, (True, True))
    (y, dx, _, _), (ry, rdx, _, _) = both(x, w, b, dy)
    assert y.dtype == torch.bfloat16 and dx.dtype == torch.bfloat16
    assert_close(y, ry, rel_rms=1e-2, name="y")
    assert_close(dx, rdx, rel_rms=1e-2, name="dx")
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert layer_norm(x.float(), w, b, 1e-5, backend="triton").dtype == torch.bfloat16


def test_module_is_nn_layer_norm_with_a_backend():
    torch.manual_seed(0)
    fused, plain = LayerNorm(12, backend="triton").to(DEVICE), torch.nn.LayerNorm(12).to(DEVICE)
    plain.load_state_dict(fused.state_dict())  # the same parameters and names
    x = torch.randn(3, 5, 12, device=DEVICE)
    assert_close(fused(x), plain(x), rel_rms=1e-5, name="y")
    with pytest.raises(ValueError, match="unknown backend"):
        LayerNorm(12, backend="trition")


def test_auto_takes_torch_off_cuda_and_empty_inputs_pass(monkeypatch):
    x = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    w = torch.ones(8, device=DEVICE, requires_grad=True)
    y = layer_norm(x, w, None, 1e-5, backend="triton")
    y.sum().backward()
    assert y.shape == (0, 8) and torch.equal(w.grad, torch.zeros(8, device=DEVICE))
    if not HAS_CUDA:  # the interpreter runs the kernels on the CPU, but "auto" must not pick them there
        fused = importlib.import_module("rebased.ops.triton.layer_norm")
        monkeypatch.setattr(fused, "fused_layer_norm", lambda *args: pytest.fail("auto ran the fused op on the CPU"))
        z = torch.randn(2, 8)
        assert torch.equal(layer_norm(z, None, None, 1e-5), F.layer_norm(z, (8,), eps=1e-5))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("tile_sums", [False, True], ids=["block-sums", "tile-sums"])
def test_gpu_mqar_feature_map_shape(dtype, tile_sums, monkeypatch):
    """The joint ReBased norm of an MQAR micro-batch: 32 x 2048 rows of 12 heads x 16 features; the backward
    with its committed launch and with either form of the gamma/beta sums."""
    fused = importlib.import_module("rebased.ops.triton.layer_norm")
    monkeypatch.setattr(fused, "BACKWARD_LAUNCH", dataclasses.replace(fused.BACKWARD_LAUNCH, tile_sums=tile_sums))
    x, w, b, dy = inputs(32 * 2048, 192, dtype, (True, True))
    (y, dx, dw, db), (ry, rdx, rdw, rdb) = both(x, w, b, dy)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close(y, ry, rel_rms=tolerance, name="y")
    assert_close(dx, rdx, rel_rms=max(tolerance, 1e-4), name="dx")
    assert_close(dw, rdw, rel_rms=1e-4, name="dweight")
    assert_close(db, rdb, rel_rms=1e-4, name="dbias")


def affine_both(x, w, b, dy):
    """both() for the fused affine against float64 x * w + b."""
    return both(x, w, b, dy, lambda *t: affine(*t, backend="triton"), lambda *t: affine(*t, backend="torch"))


@pytest.mark.parametrize("features", [5, 100, 192])
@pytest.mark.parametrize("rows", [1, 30])
@pytest.mark.parametrize("affine_terms", [(True, True), (True, False), (False, True)], ids=["wb", "w", "b"])
@pytest.mark.parametrize("tile_sums", [False, True], ids=["block-sums", "tile-sums"])
def test_fused_affine_matches_float64(features, rows, affine_terms, tile_sums, monkeypatch):
    """The kernels without the norm (the ablation's gamma x and gamma x + beta): y = x w + b, dx = dy w, and the
    gamma/beta sums in both forms."""
    fused = importlib.import_module("rebased.ops.triton.layer_norm")
    monkeypatch.setattr(fused, "BACKWARD_LAUNCH", dataclasses.replace(fused.BACKWARD_LAUNCH, tile_sums=tile_sums))
    x, w, b, dy = inputs(rows, features, torch.float32, affine_terms, seed=features + rows)
    (y, dx, dw, db), (ry, rdx, rdw, rdb) = affine_both(x, w, b, dy)
    assert y.dtype == torch.float32 and dx.dtype == torch.float32
    assert_close(y, ry, rel_rms=1e-6, name="y")
    assert_close(dx, rdx, rel_rms=1e-6, name="dx")
    for got, want, name in ((dw, rdw, "dweight"), (db, rdb, "dbias")):
        assert (got is None) == (want is None)
        if got is not None:
            assert_close(got, want, rel_rms=1e-5, name=name)


def test_affine_in_16_bits_and_without_terms():
    """A bf16 x keeps its dtype through the kernels (the torch form promotes to fp32); autocast picks the output
    dtype; with neither weight nor bias, x comes back as it is."""
    x, w, b, dy = inputs(9, 48, torch.bfloat16, (True, True))
    (y, dx, _, _), (ry, rdx, _, _) = affine_both(x, w, b, dy)
    assert y.dtype == torch.bfloat16 and dx.dtype == torch.bfloat16
    assert_close(y, ry, rel_rms=1e-2, name="y")
    assert_close(dx, rdx, rel_rms=1e-2, name="dx")
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert affine(x.float(), w, b, backend="triton").dtype == torch.bfloat16
    assert affine(x, None, None, backend="triton") is x
    with pytest.raises(ValueError, match="unknown backend"):
        affine(x, w, b, backend="trition")


def test_ablation_maps_through_the_fused_affine():
    """gamma_square and affine_square: the same q', k' and parameter gradients with the kernels as with torch."""
    from rebased.feature_maps import make_feature_map

    for name in ("gamma_square", "affine_square"):
        torch.manual_seed(0)
        fmap = make_feature_map(name, head_dim=16, num_heads=3).to(DEVICE)
        with torch.no_grad():
            for parameter in fmap.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
        q, k = (torch.randn(2, 7, 3, 16, device=DEVICE) for _ in range(2))
        outputs = {}
        for backend in ("torch", "triton"):
            fmap.zero_grad()
            fmap.backend = backend
            q2, k2 = fmap.prepare(q, k)
            (q2.square().sum() + (k2 * q2).sum()).backward()
            outputs[backend] = (q2, k2, {n: p.grad.clone() for n, p in fmap.named_parameters()})
        for got, want, part in zip(outputs["triton"][:2], outputs["torch"][:2], ("q'", "k'")):
            assert_close(got, want, rel_rms=1e-6, name=f"{name} {part}")
        assert outputs["triton"][2].keys() == outputs["torch"][2].keys() and outputs["torch"][2]
        for parameter, grad in outputs["triton"][2].items():
            assert_close(grad, outputs["torch"][2][parameter], rel_rms=1e-5, name=f"{name} {parameter}")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_affine_at_the_mqar_feature_map_shape():
    """The ablation's gamma x + beta on an MQAR micro-batch's bf16 q: 32 x 2048 rows of 12 heads x 16 features."""
    x, w, b, dy = inputs(32 * 2048, 192, torch.bfloat16, (True, True))
    (y, dx, dw, db), (ry, rdx, rdw, rdb) = affine_both(x, w, b, dy)
    assert_close(y, ry, rel_rms=1e-2, name="y")
    assert_close(dx, rdx, rel_rms=1e-2, name="dx")
    assert_close(dw, rdw, rel_rms=1e-4, name="dweight")
    assert_close(db, rdb, rel_rms=1e-4, name="dbias")
