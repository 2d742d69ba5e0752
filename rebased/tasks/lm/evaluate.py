"""Perplexity of a language model, overall and split into associative-recall (AR) and other tokens.

A window of L + 1 tokens w gives inputs w[:L] and targets w[1:]; target t (predicted from w[:t+1]) is an AR
token when the bigram (w[t], w[t+1]) already occurred earlier in the same window, at some (w[s], w[s+1]) with
s < t: the model has seen the very continuation it must now predict, so predicting it is recall, not
language knowledge (the definition used by Zoology and the ReBased paper). Perplexity = exp(mean NLL) over a
slice's tokens; position buckets split it by where in the window the target sits.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_BUCKETS = (0, 128, 512, 2048)  # position buckets: [0, 128), [128, 512), [512, 2048), [2048, L)


def recall_mask(windows: Tensor) -> Tensor:
    """[B, L] bool: target t of each window [B, L + 1] is an AR token (its bigram occurred earlier)."""
    previous, current = windows[:, :-1].long(), windows[:, 1:].long()
    vocab = int(windows.max()) + 1
    bigrams = previous * vocab + current  # [B, L], one id per bigram
    ordered, order = torch.sort(bigrams, dim=1, stable=True)  # equal bigrams in position order
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]  # not the first of its kind: seen at an earlier position
    mask = torch.empty_like(repeat)
    mask.scatter_(1, order, repeat)
    return mask


@dataclass
class PerplexityTotals:
    """Sums of NLL and token counts per slice: add batches, then read perplexities."""

    buckets: Sequence[int] = DEFAULT_BUCKETS
    nll: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, nll: Tensor, mask: Tensor) -> None:
        self.nll[name] = self.nll.get(name, 0.0) + float(nll[mask].double().sum())
        self.tokens[name] = self.tokens.get(name, 0) + int(mask.sum())

    def add_batch(self, nll: Tensor, recall: Tensor) -> None:
        """nll, recall: [B, L] per target token."""
        self.add("all", nll, torch.ones_like(recall))
        self.add("ar", nll, recall)
        self.add("other", nll, ~recall)
        positions = torch.arange(nll.shape[1], device=nll.device).expand_as(nll)
        edges = [*self.buckets, math.inf]
        for start, stop in zip(edges[:-1], edges[1:]):
            if start < nll.shape[1]:
                label = f"pos{start}-{'end' if stop >= nll.shape[1] else stop}"
                self.add(label, nll, (positions >= start) & (positions < stop))

    def perplexities(self) -> dict[str, float]:
        return {name: math.exp(self.nll[name] / count) for name, count in self.tokens.items() if count}


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module,
    windows: Iterable[Tensor],  # batches [B, L + 1] of token ids
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,  # autocast dtype (bf16 on the GPU); None: fp32
    buckets: Sequence[int] = DEFAULT_BUCKETS,
) -> dict[str, float | int]:
    """{"ppl/all", "ppl/ar", "ppl/other", "ppl/pos<a>-<b>", "tokens/<slice>"} over the windows."""
    was_training = model.training
    model.eval()
    totals = PerplexityTotals(buckets)
    device = torch.device(device)
    for batch in windows:
        batch = batch.to(device).long()
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
        with autocast:
            logits = model(batch[:, :-1])  # [B, L, V]
        nll = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
        totals.add_batch(nll.view(batch.shape[0], -1), recall_mask(batch))
    model.train(was_training)
    result: dict[str, float | int] = {f"ppl/{name}": value for name, value in totals.perplexities().items()}
    result.update({f"tokens/{name}": count for name, count in totals.tokens.items()})
    return result


def first_windows(shards, seq_len: int, batch_size: int, windows: int, bar=None) -> Iterable[Tensor]:
    """Batches of the first `windows` windows of seq_len + 1 tokens of a TokenShards split, in order."""
    left = windows
    for batch in shards.sequential(seq_len, batch_size):
        if left <= 0:
            return
        batch = batch[:left]
        left -= len(batch)
        if bar is not None:
            bar.update(len(batch))
        yield batch


def check_same_tokenizer(run_dir: Path, data: Path) -> None:
    """A model only reads shards made by its own tokenizer: same ids, same meaning."""
    from rebased.tasks.lm.shards import read_manifest
    from rebased.tasks.lm.tokenizers import load_tokenizer

    ours = load_tokenizer(run_dir).sha256
    theirs = read_manifest(data)["tokenizer"]["sha256"]
    if ours != theirs:
        raise ValueError(f"{data} was tokenized with another tokenizer (sha256 {theirs[:12]}) than the model in "
                         f"{run_dir} ({ours[:12]}): prepare it with the run's tokenizer.json")  # fmt: skip


def evaluate_run(
    run_dir: str | Path,
    data: str | Path,
    *,
    split: str = "val",
    seq_len: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, float | int]:
    """Perplexity slices of the model saved in run_dir on a split of a prepared shards folder, in windows of
    seq_len (default: the run's) that cover the split in order, the first max_tokens of it if given."""
    from tqdm.auto import tqdm

    from rebased import checkpoint
    from rebased.tasks.lm.shards import TokenShards
    from rebased.train.loop import resolve_device

    run_dir, data = Path(run_dir), Path(data)
    check_same_tokenizer(run_dir, data)
    model = checkpoint.load(run_dir)
    if seq_len is None:
        seq_len = json.loads((run_dir / "config.json").read_text()).get("run", {}).get("seq_len", 2048)
    shards = TokenShards(data, split)
    windows = (len(shards) - 1) // seq_len
    if max_tokens is not None:
        windows = min(windows, max(1, max_tokens // seq_len))
    if windows < 1:
        raise ValueError(f"{data} {split}: {len(shards):,} tokens, fewer than one window of {seq_len + 1}")
    device = resolve_device(device)
    model.to(device)
    bar = tqdm(total=windows, desc=f"eval {data.name}/{split}", unit="window", disable=not progress)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    result = evaluate_perplexity(model, first_windows(shards, seq_len, batch_size, windows, bar), device=device,
                                 dtype=dtype)  # fmt: skip
    bar.close()
    return {"data": str(data), "split": split, "seq_len": seq_len, **result}
