"""Whole models: Table 6 parameter counts, decoding equals the forward pass, causality, state sizes, configs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from rebased.config import MIXER_CONFIGS, ModelConfig, mixer_config
from rebased.model import LanguageModel, select_positions
from rebased.presets import PRESETS, mqar_model, tiny, tiny_hybrid
from rebased.testing import assert_close

T = 21
FP64_TOL = 1e-9  # float64: the forms differ only by reassociation
FP32_TOL = 1e-4  # float32 (relative RMS of the logits)

MODELS = {name: tiny(name) for name in MIXER_CONFIGS} | {"hybrid": tiny_hybrid()}
# the Taylor map's 1 + s + s^2/2 needs a feature_dim the tiny presets set; cosFormer is a non-polynomial map
MODELS["linear_attention"] = tiny(
    "linear_attention",
    mixers={"linear_attention": mixer_config("linear_attention", feature_map="cosformer", num_heads=2, feature_dim=8)},
)


def build(name: str, dtype=torch.float64) -> LanguageModel:
    torch.manual_seed(0)
    model = LanguageModel(MODELS[name]).to(dtype).eval()
    # N(0, 0.02) embeddings make every layer nearly linear; larger ones exercise the nonlinear paths
    with torch.no_grad():
        model.embedding.weight.normal_(std=1.0)
    return model


def token_ids(batch: int = 2, length: int = T, vocab: int = 256, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_mqar_parameter_counts_match_table_6():
    """d_model 64, L 256, vocab 8192 (official layout: pre-norm blocks with affine LayerNorms, tied head):

    embeddings 8192*64 + positions 256*64                          = 524,288 + 16,384 = 540,672
    block 1: norm1 128 + BaseConv (Linear 64*64+64, conv 64*3+64)  = 128 + 4,160 + 256 + norm2 128 = 4,672
    block 2: norm1 128 + Based (q, k 64*192 each; v 64*60, out 60*64; value head dim 64 // 12 = 5; no biases)
             = 128 + 24,576 + 7,680 + norm2 128                                                     = 32,512
    final LayerNorm 128; head tied                                  total Based = 577,984
    ReBased adds LayerNorm(192) for q and for k, gamma and beta: 2 * 2 * 192 = 768   ->   578,752
    """
    assert LanguageModel(mqar_model("based", 64, 256)).num_params() == 577_984
    assert LanguageModel(mqar_model("rebased", 64, 256)).num_params() == 578_752


@pytest.mark.parametrize("name", sorted(MODELS))
def test_teacher_forced_steps_equal_forward(name):
    model, ids = build(name), token_ids()
    with torch.no_grad():
        expected = model(ids)
        state, logits = None, []
        for t in range(T):
            step_logits, state = model.step(ids[:, t], state)
            logits.append(step_logits)
    assert_close(torch.stack(logits, dim=1), expected, rel_rms=FP64_TOL, name=f"{name} steps vs forward")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_prefill_then_steps_equal_forward(name):
    model, ids = build(name), token_ids()
    cut = 8
    with torch.no_grad():
        expected = model(ids)
        head, state = model.prefill(ids[:, :cut])
        logits = [head]
        for t in range(cut, T):
            step_logits, state = model.step(ids[:, t], state)
            logits.append(step_logits[:, None])
    assert_close(torch.cat(logits, dim=1), expected, rel_rms=FP64_TOL, name=f"{name} prefill + steps")


@pytest.mark.parametrize("name", ["rebased", "based", "attention", "mamba", "rwkv", "hybrid"])
def test_float32_steps_equal_forward(name):
    model, ids = build(name, torch.float32), token_ids()
    with torch.no_grad():
        expected, (head, state) = model(ids), model.prefill(ids[:, :5])
        logits = [head]
        for t in range(5, T):
            step_logits, state = model.step(ids[:, t], state)
            logits.append(step_logits[:, None])
    assert_close(torch.cat(logits, dim=1), expected, rel_rms=FP32_TOL, name=f"{name} fp32 prefill + steps")


def with_linear_attention_mode(name: str, mode: str, chunk_size: int = 8) -> LanguageModel:
    """Model `name` with every linear-attention mixer's op mode and chunk size set through the config."""
    cfg = MODELS[name]
    mixers = {
        mixer: dataclasses.replace(sub, mode=mode, chunk_size=chunk_size) if hasattr(sub, "mode") else sub
        for mixer, sub in cfg.mixers.items()
    }
    torch.manual_seed(0)
    model = LanguageModel(cfg.replace(mixers=mixers)).double().eval()
    with torch.no_grad():
        model.embedding.weight.normal_(std=1.0)
    return model


@pytest.mark.parametrize("name", ["rebased", "hybrid"])
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_chunk_and_recurrent_modes_equal_the_parallel_form(name, mode, monkeypatch):
    """Through the model config: T = 21 is two chunks of 8 and a partial one. Logits, parameter gradients and
    prefill + steps agree with the parallel form, and the op really ran in the configured mode."""
    from rebased import ops

    calls = []
    for op_mode in ops.MODES:

        def spy(*args, op_mode=op_mode, real=ops.IMPLEMENTATIONS[(op_mode, "torch")], **kwargs):
            calls.append(op_mode)
            return real(*args, **kwargs)

        monkeypatch.setitem(ops.IMPLEMENTATIONS, (op_mode, "torch"), spy)
    parallel, model = with_linear_attention_mode(name, "parallel"), with_linear_attention_mode(name, mode)
    ids = token_ids()
    expected, logits = parallel(ids), model(ids)
    assert calls == ["parallel", mode], calls  # one linear-attention layer in each model
    assert_close(logits, expected, rel_rms=FP64_TOL, name=f"{name} {mode} vs parallel")
    weights = torch.randn(logits.shape, dtype=logits.dtype, generator=torch.Generator().manual_seed(4))
    grads = torch.autograd.grad((logits * weights).sum(), list(model.parameters()))
    expected_grads = torch.autograd.grad((expected * weights).sum(), list(parallel.parameters()))
    for (param_name, _), grad, want in zip(model.named_parameters(), grads, expected_grads):
        assert_close(grad, want, rel_rms=FP64_TOL, name=f"{name} {mode} d {param_name}")
    with torch.no_grad():
        head, state = model.prefill(ids[:, :13])
        tail = []
        for t in range(13, T):
            step_logits, state = model.step(ids[:, t], state)
            tail.append(step_logits[:, None])
    assert_close(torch.cat([head, *tail], 1), expected.detach(), rel_rms=FP64_TOL, name=f"{name} {mode} prefill+steps")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_causal(name):
    model, ids = build(name), token_ids()
    t = 9
    changed = ids.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % 256
    with torch.no_grad():
        before, after = model(ids), model(changed)
    assert_close(after[:, : t + 1], before[:, : t + 1], rel_rms=1e-12, name=f"{name} logits up to t")
    assert (after[:, t + 1 :] - before[:, t + 1 :]).abs().max() > 1e-3


def test_state_size_is_fixed_for_recurrent_models_and_grows_for_attention():
    recurrent, attention = build("rebased"), build("attention")
    assert recurrent.state_size(16) == recurrent.state_size(4096)
    # a KV cache: k and v of d_model 32 per token
    assert attention.state_size(4096).elements - attention.state_size(16).elements == 2 * (4096 - 16) * 32
    # MQAR ReBased d 64: 12 heads x 256 features x (5 values + 1 normaliser) in fp32, + the conv tail 2 x 64
    size = LanguageModel(mqar_model("rebased")).state_size(256)
    assert size == (12 * 256 * 6 + 2 * 64, 4 * (12 * 256 * 6 + 2 * 64))


@pytest.mark.parametrize("name", ["rebased", "attention", "hybrid"])
def test_state_size_counts_the_real_state(name):
    model, ids = build(name, torch.float32), token_ids(batch=3)
    with torch.no_grad():
        _, state = model.prefill(ids)

    def tensors(x):
        if isinstance(x, torch.Tensor):
            return [x]
        return [t for part in x for t in tensors(part)] if isinstance(x, (tuple, list)) else []

    found = tensors(state.layers)
    assert model.state_size(T, batch=3) == (sum(t.numel() for t in found), sum(t.numel() * 4 for t in found))


def test_initialisation():
    model = LanguageModel(mqar_model("rebased", 64, 256))
    assert abs(model.embedding.weight.std().item() - 0.02) < 1e-3
    out = model.layers[1].mixer.out_proj.weight
    assert abs(out.std().item() - 0.02 / 2) < 2e-3  # 0.02 / sqrt(2 n_layers), n_layers = 2
    assert model.lm_head.weight is model.embedding.weight


def test_positions_beyond_the_table_fail():
    model = LanguageModel(tiny("rebased", max_position_embeddings=4))
    with pytest.raises(ValueError, match="max_position_embeddings=4"):
        model(token_ids(length=5))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name):
    cfg = PRESETS[name]()
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_config_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown fields"):
        ModelConfig.from_dict({**tiny().to_dict(), "d_modle": 3})
    with pytest.raises(ValueError, match="does not accept"):
        ModelConfig.from_dict({**tiny().to_dict(), "mixers": {"rebased": {"heads": 2}}})


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"pattern": ("base_conv", "rebase")}, "unknown mixer 'rebase'"),
        ({"mlp": "relu"}, "mlp='relu'"),
        ({"norm": "batchnorm"}, "norm='batchnorm'"),
        ({"d_model": 0}, "d_model=0"),
        ({"embed_dropout": 1.5}, "embed_dropout=1.5"),
        ({"mixers": {"attention": mixer_config("attention", num_heads=5)}, "pattern": ("attention",)}, "num_heads=5"),
    ],
)
def test_bad_model_configs_fail_at_construction(changes, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("(", r"\(")):
        tiny().replace(**changes)


def test_dropout_only_in_training():
    model = LanguageModel(tiny("rebased", embed_dropout=0.5, resid_dropout=0.5)).eval()
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids))
        model.train()
        assert not torch.equal(model(ids), model(ids))


def test_model_code_never_imports_triton():
    """The model must run wherever torch does: triton only ever comes in through the ops' lazy backend."""
    import ast
    from pathlib import Path

    import rebased

    root = Path(rebased.__file__).parent
    files = [*(root / "mixers").glob("*.py"), root / "model.py", root / "generate.py", root / "checkpoint.py"]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any("triton" in name for name in names), f"{path.name} imports {names}"


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("fused_from", [0, 2**40])  # the fused op, and the plain head below the threshold
def test_fused_loss_equals_cross_entropy_of_the_logits(tied, fused_from, monkeypatch):
    """forward(ids, select=, targets=) is the summed cross-entropy of forward(ids, select=), with the same
    gradients for every parameter (the tied head's from both its uses); float64, so any difference is a bug."""
    monkeypatch.setattr("rebased.model.FUSED_LOSS_MIN_LOGITS", fused_from)
    torch.manual_seed(0)
    model = LanguageModel(tiny("rebased", tie_embeddings=tied)).double()
    ids = torch.randint(0, 256, (3, 12))
    positions = torch.tensor([1, 5, 11, 14, 20, 30, 35])
    targets = torch.tensor([3, 7, -100, 250, 0, 9, -100])
    fused = model(ids, select=positions, targets=targets)
    fused.backward()
    fused_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    plain = torch.nn.functional.cross_entropy(model(ids, select=positions), targets, reduction="sum")
    plain.backward()
    assert_close(fused, plain, rel_rms=1e-12, name="loss")
    for (name, p), grad in zip(model.named_parameters(), fused_grads, strict=True):
        assert_close(grad, p.grad, rel_rms=1e-10, atol=1e-15, name=name)
    all_positions = model(ids, targets=ids)  # without select: targets [B, T]
    expected = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten(), reduction="sum")
    assert_close(all_positions, expected, rel_rms=1e-12, name="loss at every position")


def test_selected_rows_and_their_gradient_match_plain_indexing():
    """select_positions with flat indices (index_select, its gradient by index_add_) against indexing (index_put_
    accumulating), with a repeated index whose upstream gradient is zero, as the label table's padding has."""
    torch.manual_seed(0)
    x = torch.randn(3, 7, 4, requires_grad=True)
    flat = torch.tensor([2, 9, 0, 20, 0])  # the last 0 repeats: padding, its gradient 0
    upstream = torch.randn(len(flat), 4)
    upstream[-1] = 0.0
    got = select_positions(x, flat)
    (dx,) = torch.autograd.grad(got, x, upstream)
    want = x.flatten(0, 1)[flat]
    (want_dx,) = torch.autograd.grad(want, x, upstream)
    assert torch.equal(got, want) and torch.equal(dx, want_dx)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask.view(-1)[flat[:-1]] = True
    assert torch.equal(select_positions(x, mask), x.flatten(0, 1)[flat[:-1].sort().values])


@pytest.mark.parametrize("offset", [0, 5])
def test_position_slice_equals_the_lookup(offset):
    """The position embeddings as a slice of the table (int offsets) and as a lookup (a tensor offset, decoding
    under a CUDA graph): the same rows and the same table gradient."""
    torch.manual_seed(1)
    model = LanguageModel(mqar_model("rebased", d_model=16, seq_len=32))
    upstream = torch.randn(11, 16)
    got = model._positions(offset, 11, torch.device("cpu"))
    want = model._positions(torch.tensor(offset), 11, torch.device("cpu"))
    table = model.position_embedding.weight
    (grad,) = torch.autograd.grad(got, table, upstream)
    (want_grad,) = torch.autograd.grad(want, table, upstream)
    assert torch.equal(got, want) and torch.equal(grad, want_grad)
    assert torch.equal(got, table[offset : offset + 11])
