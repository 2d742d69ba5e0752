"""rebased.tasks.lm.evaluate: the AR rule on hand-built windows with known answers and against a plain loop;
perplexity slices that partition the tokens, on a model whose perplexity is known."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rebased.tasks.lm.evaluate import evaluate_perplexity, recall_mask


def recall_by_loop(window: list[int]) -> list[bool]:
    bigrams = list(zip(window[:-1], window[1:]))
    return [bigrams[t] in bigrams[:t] for t in range(len(bigrams))]


@pytest.mark.parametrize(
    "window, expected",
    [
        ([5, 7, 5, 7, 9], [False, False, True, False]),  # (5, 7) again at target 2
        ([1, 1, 1, 1], [False, True, True]),  # one bigram, repeated
        ([3, 4, 2, 4], [False, False, False]),  # the token repeats, the bigram does not
        ([2, 9, 8, 2, 9, 8, 2], [False, False, False, True, True, True]),  # a repeated phrase is recalled
        ([6], []),
    ],
)
def test_recall_mask_on_hand_built_windows(window, expected):
    assert recall_mask(torch.tensor([window])).tolist() == [expected]


def test_recall_mask_rows_are_independent_and_match_a_plain_loop():
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 6, (16, 40), generator=generator)
    windows[1] = torch.tensor([5, 7, 5, 7, 9] * 8)
    expected = [recall_by_loop(row.tolist()) for row in windows]
    assert recall_mask(windows).tolist() == expected
    assert any(any(row) for row in expected) and not all(all(row) for row in expected)


class Uniform(nn.Module):
    """Equal logits over the vocabulary: perplexity V on every slice."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.dummy = vocab, nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.vocab) + self.dummy


class CopyPrevious(nn.Module):
    """Puts almost all mass on repeating the previous bigram's continuation (a perfect AR predictor on
    windows made of a repeated phrase), uniform elsewhere."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, self.vocab)
        for b, row in enumerate(ids.tolist()):
            seen = {}
            for t in range(len(row)):
                if row[t] in seen:
                    logits[b, t, seen[row[t]]] = 30.0
                if t + 1 < len(row):
                    seen[row[t]] = row[t + 1]
        return logits


def test_perplexity_slices_partition_the_tokens_and_take_known_values():
    windows = [torch.randint(0, 10, (3, 301), generator=torch.Generator().manual_seed(1))]
    result = evaluate_perplexity(Uniform(10), windows, buckets=(0, 128))
    assert result["tokens/all"] == 900 == result["tokens/ar"] + result["tokens/other"]
    assert result["tokens/pos0-128"] + result["tokens/pos128-end"] == 900
    for name in ("all", "ar", "other", "pos0-128", "pos128-end"):
        assert result[f"ppl/{name}"] == pytest.approx(10.0, rel=1e-6)


def test_recall_tokens_get_low_perplexity_from_a_model_that_recalls():
    phrase = [3, 1, 4, 0, 5, 9, 2, 6]  # distinct tokens: each has one continuation
    windows = [torch.tensor([phrase * 4 + [3]])]  # 33 tokens: the first pass is new, the rest is recall
    result = evaluate_perplexity(CopyPrevious(10), windows)
    assert result["tokens/ar"] == 24 and result["tokens/other"] == 8
    assert result["ppl/ar"] < 1.001
    assert result["ppl/other"] > 5.0
    assert math.isclose(
        math.log(result["ppl/all"]) * 32,
        math.log(result["ppl/ar"]) * 24 + math.log(result["ppl/other"]) * 8,
        rel_tol=1e-9,
    )
