"""Generation: prefill + recurrent steps equal recomputing the full forward; batching, stops, sampling, CLI."""

from __future__ import annotations

import pytest
import torch

from rebased.checkpoint import save
from rebased.cli import main
from rebased.generate import filter_logits, generate
from rebased.model import LanguageModel
from rebased.presets import tiny, tiny_hybrid

PROMPTS = [[5, 17, 3, 99, 42, 7, 1], [8, 8, 200], [31, 64, 2, 11, 250]]


def build(cfg) -> LanguageModel:
    torch.manual_seed(0)
    model = LanguageModel(cfg).double().eval()
    with torch.no_grad():  # spread the logits so that greedy choices are not near-ties
        model.embedding.weight.normal_(std=1.0)
    return model


def greedy_by_full_forward(model: LanguageModel, prompt: list[int], steps: int) -> list[int]:
    """The quadratic reference: rerun the whole sequence for every new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize(
    "make", [lambda: tiny("rebased"), lambda: tiny("mamba"), tiny_hybrid], ids=["rebased", "mamba", "hybrid"]
)
def test_greedy_equals_recomputing_the_forward(make):
    model = build(make())
    got = generate(model, [PROMPTS[0]], 12, temperature=0.0)
    assert got == [greedy_by_full_forward(model, PROMPTS[0], 12)]


@pytest.mark.parametrize("make", [lambda: tiny("rebased"), lambda: tiny("attention")], ids=["rebased", "attention"])
def test_batched_prompts_of_different_lengths_equal_each_alone(make):
    model = build(make())
    batched = generate(model, PROMPTS, 8, temperature=0.0)
    alone = [generate(model, [prompt], 8, temperature=0.0)[0] for prompt in PROMPTS]
    assert batched == alone
    assert all(len(tokens) == 8 for tokens in batched)


def test_stop_tokens_end_a_row_without_being_emitted():
    model = build(tiny("rebased"))
    free = generate(model, PROMPTS, 8, temperature=0.0)
    stop = free[0][3]
    stopped = generate(model, PROMPTS, 8, temperature=0.0, stop_tokens=[stop])
    for tokens, reference in zip(stopped, free):
        expected = reference[: reference.index(stop)] if stop in reference else reference
        assert tokens == expected
    assert len(stopped[0]) == free[0].index(stop) <= 3


def test_sampling_is_reproducible_with_a_generator():
    torch.manual_seed(0)
    model = LanguageModel(tiny("rebased")).eval()  # the N(0, 0.02) init: nearly uniform next-token probabilities

    def draw(seed: int) -> list[list[int]]:
        return generate(model, PROMPTS, 10, temperature=1.5, generator=torch.Generator().manual_seed(seed))

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_top_k_one_and_tiny_top_p_are_greedy():
    torch.manual_seed(0)
    model = LanguageModel(tiny("rebased")).eval()  # nearly uniform: plain sampling would not be greedy
    assert generate(model, PROMPTS, 6, temperature=1.0, generator=torch.Generator().manual_seed(0)) != generate(
        model, PROMPTS, 6, temperature=0.0
    )
    greedy = generate(model, PROMPTS, 6, temperature=0.0)
    gen = torch.Generator().manual_seed(0)
    assert generate(model, PROMPTS, 6, temperature=1.0, top_k=1, generator=gen) == greedy
    assert generate(model, PROMPTS, 6, temperature=1.0, top_p=1e-6, generator=gen) == greedy


def test_filter_logits_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_p=0.8))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.8
    assert torch.isfinite(filter_logits(logits, top_k=3)).sum() == 3


def test_streaming_callback_sees_every_token_in_order():
    model = build(tiny("rebased"))
    seen: list[tuple[int, int]] = []
    out = generate(model, [PROMPTS[1]], 5, temperature=0.0, on_token=lambda row, token: seen.append((row, token)))
    assert seen == [(0, t) for t in out[0]]


def test_bad_arguments():
    model = build(tiny("rebased"))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], 3)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, PROMPTS, 3, top_p=0.0)


def test_cli_streams_the_greedy_tokens(tmp_path, capsys):
    model = build(tiny("rebased")).float()
    save(model, tmp_path)
    expected = generate(model, [PROMPTS[0]], 6, temperature=0.0)[0]
    prompt = " ".join(map(str, PROMPTS[0]))
    assert main(["generate", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "6", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.split() == [str(t) for t in expected]


def test_cli_reports_a_missing_run(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "1 2"]) == 2
    assert "config.json" in capsys.readouterr().err
