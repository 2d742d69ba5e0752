"""rebased.decode: the static-buffer decoder equals the plain path (logits, greedy and sampled tokens, stop
tokens, streaming, mixed prompt lengths) for every mixer with a fixed-size state; on a GPU, under a CUDA graph."""

from __future__ import annotations

import pytest
import torch

from rebased.decode import StaticDecoder, generate_static
from rebased.generate import generate
from rebased.model import LanguageModel
from rebased.presets import tiny, tiny_hybrid

PROMPTS = [[5, 17, 3, 99, 42, 7, 1], [8, 8, 200], [31, 64, 2, 11, 250]]
HAS_CUDA = torch.cuda.is_available()
MIXERS = ["rebased", "based", "attention", "sliding_window", "base_conv", "mamba", "rwkv"]


def build(cfg, dtype=torch.float64, device="cpu") -> LanguageModel:
    torch.manual_seed(0)
    model = LanguageModel(cfg).to(device=device, dtype=dtype).eval()
    with torch.no_grad():  # spread the logits so that greedy choices are not near-ties
        model.embedding.weight.normal_(std=1.0)
    return model


@pytest.mark.parametrize("prefill_tokens", [1 << 20, 5], ids=["one-pass", "row-by-row"])
def test_static_steps_give_the_plain_steps_logits(prefill_tokens, monkeypatch):
    """Prefill 5 tokens (all rows at once, or a row per pass), then 19 steps, crossing the sliding window (8)."""
    import rebased.decode

    monkeypatch.setattr(rebased.decode, "PREFILL_TOKENS", prefill_tokens)
    for mixer in MIXERS:
        model = build(tiny(mixer))
        ids = torch.randint(0, 256, (2, 25), generator=torch.Generator().manual_seed(1))
        decoder = StaticDecoder(model, batch=2, capacity=25)
        static = [decoder.prefill(ids[:, :5])]
        logits, state = model.prefill(ids[:, :5])
        plain = [logits[:, -1]]
        for t in range(5, 24):
            static.append(decoder.step(ids[:, t]).clone())
            logits, state = model.step(ids[:, t], state)
            plain.append(logits)
        torch.testing.assert_close(torch.stack(static), torch.stack(plain), rtol=1e-10, atol=1e-10, msg=mixer)


@pytest.mark.slow
def test_a_compiled_step_gives_the_eager_steps_logits():
    """torch.compile of the static step (opt-in: fewer, fused kernels under the graph) changes no result."""
    for mixer in ("rebased", "attention"):
        model = build(tiny(mixer), dtype=torch.float32)
        ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
        eager, compiled = (StaticDecoder(model, 2, 12, compile=c) for c in (False, True))
        for decoder in (eager, compiled):
            decoder.prefill(ids[:, :4])
        for t in range(4, 11):
            torch.testing.assert_close(compiled.step(ids[:, t]), eager.step(ids[:, t]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [lambda m=m: tiny(m) for m in MIXERS] + [tiny_hybrid], ids=[*MIXERS, "hybrid"])
def test_greedy_tokens_equal_the_plain_path_for_prompts_of_different_lengths(make):
    model = build(make())
    assert generate_static(model, PROMPTS, 10, temperature=0.0) == generate(model, PROMPTS, 10, temperature=0.0)


def test_sampling_with_a_seeded_generator_draws_the_same_tokens():
    model = build(tiny("rebased"))
    options = dict(temperature=0.8, top_k=50, top_p=0.9)
    fast = generate_static(model, PROMPTS, 12, generator=torch.Generator().manual_seed(3), **options)
    plain = generate(model, PROMPTS, 12, generator=torch.Generator().manual_seed(3), **options)
    assert fast == plain


def test_stop_tokens_streaming_and_zero_new_tokens_behave_as_on_the_plain_path(monkeypatch):
    import rebased.decode

    monkeypatch.setattr(rebased.decode, "STOP_CHECK_EVERY", 2)  # the early exit runs in a short generation
    model = build(tiny("rebased"))
    free = generate(model, PROMPTS, 40, temperature=0.0)
    stops = [free[0][3], free[2][1]]
    streamed: list[tuple[int, int]] = []
    fast = generate_static(model, PROMPTS, 40, temperature=0.0, stop_tokens=stops,
                           on_token=lambda row, token: streamed.append((row, token)))  # fmt: skip
    assert fast == generate(model, PROMPTS, 40, temperature=0.0, stop_tokens=stops)
    assert [[t for r, t in streamed if r == row] for row in range(3)] == fast
    assert generate_static(model, PROMPTS, 0) == [[], [], []]


def test_hyena_falls_back_to_the_plain_path_and_bad_capacities_are_refused():
    model = build(tiny("hyena"))
    assert generate_static(model, PROMPTS, 5, temperature=0.0) == generate(model, PROMPTS, 5, temperature=0.0)
    with pytest.raises(NotImplementedError, match="Hyena"):
        StaticDecoder(model, 1, 16).prefill(torch.tensor([[1, 2, 3]]))
    positional = build(tiny("rebased", max_position_embeddings=32))
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        StaticDecoder(positional, 1, 33)
    with pytest.raises(ValueError, match="prefill takes"):
        StaticDecoder(positional, 1, 8).prefill(torch.zeros(1, 8, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("mixer", MIXERS)
def test_cuda_graph_replays_the_plain_greedy_path(mixer):
    """bf16 on the GPU, the step captured as a CUDA graph (the fused Triton step for the linear attentions)."""
    model = build(tiny(mixer, d_model=64), dtype=torch.bfloat16, device="cuda")
    decoder = StaticDecoder(model, batch=3, capacity=40)
    assert decoder.cuda_graph
    prompts = [[int(t) for t in torch.randint(0, 256, (n,))] for n in (12, 5, 9)]
    fast = generate_static(model, prompts, 24, temperature=0.0)
    assert fast == generate(model, prompts, 24, temperature=0.0)


def test_generation_benchmark_writes_its_table_and_plot(tmp_path):
    import json

    from rebased.cli import main

    out = tmp_path / "bench"
    argv = ["bench", "--generate", "--preset", "tiny", "--models", "rebased,attention", "--batches", "2",
            "--contexts", "8,24", "--decode-steps", "2", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads((out / "generate.json").read_text())["rows"]
    assert [(r["model"], r["context"]) for r in rows] == [("rebased", 8), ("rebased", 24), ("attention", 8),
                                                          ("attention", 24)]  # fmt: skip
    assert all(r["status"] == "ok" and r["step_ms"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert all(r["plain_step_ms"] > 0 for r in rows)
    assert "| attention | 2     | 24" in (out / "generate.md").read_text()
    assert (out / "generate.png").stat().st_size > 0
