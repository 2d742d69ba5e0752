"""Every mixer: step-by-step == forward, prefill + steps == forward, causality, state size, bad configs.

Equivalence runs in float64, where the forms differ only by reassociation: tolerance rel-RMS 1e-9.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rebased import ops
from rebased.config import MIXER_CONFIGS, ModelConfig, mixer_config
from rebased.mixers import MIXERS, from_fla, make_mixer
from rebased.mixers.rwkv import RWKV
from rebased.testing import assert_close

D, T = 32, 23  # T is not a multiple of any chunk size or window below
OPTIONS = {
    "linear_attention": {"feature_map": "cosformer", "num_heads": 4, "feature_dim": 8, "chunk_size": 8},
    "rebased": {"num_heads": 4, "chunk_size": 8},
    "based": {"num_heads": 4, "feature_dim": 8},
    "attention": {"num_heads": 4, "rotary": True},
    "sliding_window": {"num_heads": 4, "window": 5, "rotary": True},
    "base_conv": {},
    "gated_base_conv": {},
    "hyena": {"max_len": 64, "filter_hidden": 16},
    "mamba": {"d_state": 8, "chunk_size": 8},
    "rwkv": {"chunk_size": 8},
}
FP64_TOL = 1e-9


def build(name: str, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    return make_mixer(name, D, **OPTIONS[name]).to(dtype)


def inputs(dtype=torch.float64, batch: int = 2, length: int = T, seed: int = 1):
    return torch.randn(batch, length, D, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def run_steps(mixer, x, state=None):
    outputs = []
    for t in range(x.shape[1]):
        y, state = mixer.step(x[:, t], state)
        outputs.append(y)
    return torch.stack(outputs, dim=1), state


def tensors_in(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, (tuple, list)):
        return [t for part in state for t in tensors_in(part)]
    return []


def test_registry_names_match_configs():
    assert set(MIXERS) == set(MIXER_CONFIGS) == set(OPTIONS)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_step_by_step_equals_forward(name):
    mixer, x = build(name), inputs()
    with torch.no_grad():
        expected = mixer(x)
        stepped, _ = run_steps(mixer, x)
    assert_close(stepped, expected, rel_rms=FP64_TOL, name=f"{name} steps vs forward")


@pytest.mark.parametrize("name", sorted(MIXERS))
@pytest.mark.parametrize("cut", [1, 9, T - 1])
def test_prefill_then_steps_equals_forward(name, cut):
    mixer, x = build(name), inputs()
    with torch.no_grad():
        expected = mixer(x)
        head, state = mixer.prefill(x[:, :cut])
        tail, _ = run_steps(mixer, x[:, cut:], state)
    assert_close(torch.cat([head, tail], dim=1), expected, rel_rms=FP64_TOL, name=f"{name} prefill {cut} + steps")


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_causal(name):
    mixer, x = build(name), inputs()
    t = 11
    changed = x.clone()
    changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :])
    with torch.no_grad():
        before, after = mixer(x), mixer(changed)
    assert_close(after[:, : t + 1], before[:, : t + 1], rel_rms=1e-12, name=f"{name} outputs up to t")
    assert (after[:, t + 1 :] - before[:, t + 1 :]).abs().max() > 1e-3, "later outputs should react to later inputs"


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_float32_forward_backward_and_step(name):
    mixer, x = build(name, torch.float32), inputs(torch.float32).requires_grad_()
    y = mixer(x)
    y.square().mean().backward()
    grads = [p.grad for p in mixer.parameters() if p.requires_grad]
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(g is not None and torch.isfinite(g).all() for g in grads), f"{name}: missing or non-finite grads"
    with torch.no_grad():
        stepped, _ = run_steps(mixer, x.detach())
    assert_close(stepped, y.detach(), rel_rms=1e-5, name=f"{name} fp32 steps vs forward")


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_state_elements_match_the_state(name):
    mixer, x = build(name), inputs(batch=3)
    with torch.no_grad():
        _, state = mixer.prefill(x)
    fp32, activations = mixer.state_elements(T)
    assert sum(t.numel() for t in tensors_in(state)) == 3 * (fp32 + activations)


def test_sliding_window_matches_a_banded_mask():
    mixer, x = build("sliding_window"), inputs()
    with torch.no_grad():
        q, k, v = mixer._qkv(x, 0)
        gap = torch.arange(T)[:, None] - torch.arange(T)[None, :]
        band = (gap >= 0) & (gap < mixer.window)
        expected = mixer._out(F.scaled_dot_product_attention(q, k, v, attn_mask=band))
        assert_close(mixer(x), expected, rel_rms=FP64_TOL, name="sliding window vs banded mask")
        full = make_mixer("attention", D, **OPTIONS["attention"]).double()
        full.load_state_dict(mixer.state_dict())
        assert (full(x) - mixer(x)).abs().max() > 1e-3, "the window must matter"


@pytest.mark.parametrize("name", ["mamba", "rwkv"])
def test_chunk_size_does_not_change_the_output(name):
    mixer, x = build(name), inputs()
    with torch.no_grad():
        expected = mixer(x)
        for size in (1, 4, 64):
            mixer.cfg = mixer.cfg.__class__(**{**mixer.cfg.__dict__, "chunk_size": size})
            assert_close(mixer(x), expected, rel_rms=FP64_TOL, name=f"{name} chunk {size}")


LINEAR_MIXERS = ["rebased", "based", "linear_attention"]


def record_op_modes(monkeypatch) -> list[tuple[str, int]]:
    """(mode, chunk_size) of every torch linear-attention call from now on: which form a mixer really ran."""
    calls = []
    for mode in ops.MODES:

        def spy(*args, mode=mode, real=ops.IMPLEMENTATIONS[(mode, "torch")], **kwargs):
            calls.append((mode, kwargs["chunk_size"]))
            return real(*args, **kwargs)

        monkeypatch.setitem(ops.IMPLEMENTATIONS, (mode, "torch"), spy)
    return calls


def with_mode(name: str, mode: str, chunk_size: int, dtype=torch.float64):
    """The linear-attention mixer `name` with the op mode and chunk size set through its config."""
    torch.manual_seed(0)
    return make_mixer(name, D, **{**OPTIONS[name], "mode": mode, "chunk_size": chunk_size}).to(dtype)


@pytest.mark.parametrize("name", LINEAR_MIXERS)
@pytest.mark.parametrize(("mode", "chunk_size"), [("chunk", 8), ("chunk", 1), ("chunk", 64), ("recurrent", 8)])
def test_linear_attention_modes_equal_the_parallel_form(name, mode, chunk_size, monkeypatch):
    """The config's mode reaches the op: chunk (T = 23: two chunks of 8 and a partial one; one token a chunk;
    one partial chunk) and recurrent give the parallel form's outputs, prefill states and gradients."""
    parallel, mixer = with_mode(name, "parallel", chunk_size), with_mode(name, mode, chunk_size)
    x = inputs().requires_grad_()
    calls = record_op_modes(monkeypatch)
    expected = parallel(x)
    assert calls == [("parallel", chunk_size)]
    calls.clear()
    y = mixer(x)
    assert calls == [(mode, chunk_size)], f"the mixer ran {calls}, not its config's mode {mode!r}"
    assert_close(y, expected, rel_rms=FP64_TOL, name=f"{name} {mode} vs parallel")
    weights = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((y * weights).sum(), [x, *mixer.parameters()])
    expected_grads = torch.autograd.grad((expected * weights).sum(), [x, *parallel.parameters()])
    names = ["dx", *(n for n, _ in mixer.named_parameters())]
    for grad_name, grad, want in zip(names, grads, expected_grads):
        assert_close(grad, want, rel_rms=FP64_TOL, name=f"{name} {mode} {grad_name}")
    with torch.no_grad():
        y_head, state = mixer.prefill(x[:, :19])
        want_head, want_state = parallel.prefill(x[:, :19])
        tail, _ = run_steps(mixer, x[:, 19:], state)
    assert_close(y_head, want_head, rel_rms=FP64_TOL, name=f"{name} {mode} prefill")
    assert_close(state.attention.kv, want_state.attention.kv, rel_rms=FP64_TOL, name=f"{name} {mode} state kv")
    assert_close(state.attention.k_sum, want_state.attention.k_sum, rel_rms=FP64_TOL, name=f"{name} {mode} k_sum")
    assert_close(tail, expected[:, 19:].detach(), rel_rms=FP64_TOL, name=f"{name} {mode} prefill + steps")


def test_auto_mode_takes_the_chunk_form_beyond_the_crossover(monkeypatch):
    """The mixers' default mode is auto: parallel up to PARALLEL_MAX_LENGTH, the chunk form beyond (the
    threshold lowered to 16 so that T = 23 crosses it), with the same outputs either way."""
    mixer = build("rebased")
    assert mixer.cfg.mode == "auto"
    calls = record_op_modes(monkeypatch)
    with torch.no_grad():
        short = mixer(inputs())
        monkeypatch.setitem(ops.PARALLEL_MAX_LENGTH, "torch", 16)
        long = mixer(inputs())
    assert calls == [("parallel", 8), ("chunk", 8)]
    assert_close(long, short, rel_rms=FP64_TOL, name="auto: chunk vs parallel")


def test_rwkv_is_stable_where_the_naive_form_overflows():
    """Keys of size ~300 overflow exp in fp32 (max ~88); the running-max form stays finite and exact."""
    torch.manual_seed(0)
    mixer = RWKV(D, mixer_config("rwkv", chunk_size=8))
    with torch.no_grad():
        mixer.key.weight.mul_(3e3)
        x = inputs(torch.float32)
        k = mixer.key(x)
        assert k.abs().max() > 200 and not torch.isfinite(k.exp()).all()
        y = mixer(x)
        reference = mixer.double()(x.double())
    assert torch.isfinite(y).all()
    assert_close(y.double(), reference, rel_rms=1e-4, name="fp32 vs fp64 RWKV at huge keys")


def test_from_fla_maps_arguments_and_rejects_the_rest():
    layer = from_fla(hidden_size=64, feature_dim=16, num_heads=4, num_key_value_heads=4, eps=1e-5, mode="chunk")
    assert layer.cfg.feature_map == "rebased" and layer.eps == 1e-5 and layer.cfg.mode == "chunk"
    assert layer.feature_map.q_norm.weight.shape == (16,)  # fla's per-head LayerNorm, shared across heads
    ablation = from_fla(hidden_size=64, num_heads=4, num_key_value_heads=4, use_beta=False, normalize=False)
    assert ablation.cfg.feature_map == "gamma_square"
    with pytest.raises(ValueError, match="num_key_value_heads"):
        from_fla(hidden_size=64, num_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="causal"):
        from_fla(hidden_size=64, num_heads=4, num_key_value_heads=4, causal=False)
    with pytest.raises(ValueError, match="use_gamma"):
        from_fla(hidden_size=64, num_heads=4, num_key_value_heads=4, use_gamma=False, use_beta=True)


def test_bad_configs_fail_naming_the_field():
    with pytest.raises(ValueError, match="unknown mixer 'rebasd'.*did you mean 'rebased'"):
        make_mixer("rebasd", D)
    with pytest.raises(ValueError, match="unknown mixer"):
        ModelConfig(pattern=("base_conv", "transformer"))
    with pytest.raises(ValueError, match=r"mixers\['attention'\].num_heads=3"):
        ModelConfig(d_model=64, pattern=("attention",), mixers={"attention": mixer_config("attention", num_heads=3)})
    with pytest.raises(ValueError, match=r"window=0"):
        ModelConfig(pattern=("sliding_window",), mixers={"sliding_window": mixer_config("sliding_window", window=0)})
    with pytest.raises(ValueError, match="kernel_size"):
        make_mixer("base_conv", D, kernel_size=0)
    with pytest.raises(ValueError, match="max_len"):
        build("hyena")(inputs(length=65))


@pytest.mark.parametrize("name", ["rebased", "linear_attention", "based"])
def test_linear_attention_gives_the_op_one_dtype_under_autocast(name, monkeypatch):
    """The GPU smoke run found LayerNorm'd q, k in fp32 beside a bf16 v, which the Triton op rejects.

    CUDA autocast runs layer_norm in fp32; CPU autocast keeps it in bf16 but runs softmax in fp32, so on
    the CPU the Hedgehog map (softmax features) is the case that shows the mismatch."""
    import rebased.mixers.linear_attention as module

    seen = []
    real = module.linear_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(module, "linear_attention", spy)
    options = {**OPTIONS[name], "feature_map": "hedgehog"} if name == "linear_attention" else OPTIONS[name]
    mixer = make_mixer(name, D, **options)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixer(inputs(torch.float32))
    assert seen == [(torch.bfloat16,) * 3]


def test_sliding_window_training_memory_is_linear_in_length(monkeypatch):
    """Every score block the forward builds has at most 2w keys per query: O(T w), never T x T."""
    import rebased.mixers.attention as module

    score_sizes = []
    real = module.F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        score_sizes.append(q.shape[:-1].numel() * k.shape[-2])
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(module.F, "scaled_dot_product_attention", spy)
    mixer = make_mixer("sliding_window", D, num_heads=4, window=4)
    length = 256
    with torch.no_grad():
        mixer(inputs(torch.float32, batch=1, length=length))
    assert score_sizes and max(score_sizes) <= 4 * length * 2 * 4  # H * T * 2w
