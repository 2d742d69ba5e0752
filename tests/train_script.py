"""A tiny model, a toy task and a command line around rebased.train, for the tests that need a process of
their own: SIGKILL-and-resume, and torchrun data parallelism. tests/test_train.py imports the pieces too.

    python tests/train_script.py RUN_DIR OUT.pt [--epochs E] [--dropout P] ...   # OUT.pt: final parameters
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rebased.train import IGNORE_INDEX, TrainConfig, train

VOCAB, DIM = 16, 32


class TinyLM(nn.Module):
    """Embedding, a causal running mean (so positions interact), an MLP with dropout, a head; `select` as
    train() passes it: logits only at the flat positions b * T + t it lists."""

    def __init__(self, generator: torch.Generator, dropout: float = 0.0):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, DIM)
        self.mix = nn.Linear(2 * DIM, DIM)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(DIM, VOCAB)
        self.selections: list[Tensor] = []  # what forward was asked for, so tests can check it
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0.0, 0.2, generator=generator)

    def forward(self, ids: Tensor, select: Tensor | None = None) -> Tensor:
        x = self.embedding(ids)  # [B, T, D]
        steps = torch.arange(1, ids.shape[1] + 1, device=ids.device).view(1, -1, 1)
        context = x.cumsum(1) / steps
        h = self.drop(torch.nn.functional.gelu(self.mix(torch.cat([x, context], -1))))
        if select is not None:
            self.selections.append(select)
            h = h.flatten(0, 1)[select]  # [M, D]
        return self.head(h)


def make_model(seed: int = 0, dropout: float = 0.0) -> TinyLM:
    return TinyLM(torch.Generator().manual_seed(seed), dropout)


def make_data(n: int = 128, length: int = 8, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Label (3 x + 1) mod V at about half of the positions, -100 elsewhere: learnable, partly labelled."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, VOCAB, (n, length), generator=generator)
    labels = (3 * inputs + 1) % VOCAB
    labels[torch.rand(n, length, generator=generator) < 0.5] = IGNORE_INDEX
    return inputs, labels


def accuracy(model: nn.Module, data: tuple[Tensor, Tensor]) -> float:
    inputs, labels = data
    mask = labels != IGNORE_INDEX
    predictions = model(inputs).argmax(-1)
    return (predictions[mask] == labels[mask]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("out")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--eval-sleep", type=float, default=0.0, help="seconds per evaluation: a slow run to kill")
    parser.add_argument("--config", default="{}", help="TrainConfig fields as JSON")
    args = parser.parse_args()
    config = TrainConfig(**{"early_stop_metric": None, **json.loads(args.config)})
    model, data = make_model(dropout=args.dropout), make_data()

    def evaluate(m: nn.Module) -> dict[str, float]:
        time.sleep(args.eval_sleep)
        return {"accuracy": accuracy(m, data)}

    threads_at_destroy = count_gloo_threads_at_destroy()
    result = train(model, data, config, args.run_dir, evaluate=evaluate, progress=False)
    if int(os.environ.get("RANK", "0")) == 0:
        threads = {"at_destroy": threads_at_destroy, "after_train": gloo_threads()}
        saved = {"params": model.state_dict(), "result": dataclasses.asdict(result), "gloo_threads": threads}
        torch.save(saved, args.out)


def count_gloo_threads_at_destroy() -> list[int | None]:
    """Wrap destroy_process_group to count gloo's threads as it returns: none may be left, or the group outlives
    it (a later release can deadlock, one at exit abort the process)."""
    counts, destroy = [], dist.destroy_process_group

    def destroy_and_count(*args, **kwargs) -> None:
        destroy(*args, **kwargs)
        counts.append(gloo_threads())

    dist.destroy_process_group = destroy_and_count
    return counts


def gloo_threads() -> int | None:
    """Threads of a gloo process group running in this process (None where /proc cannot say)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return None
    return sum(_thread_name(task).startswith(("pt_gloo", "gloo")) for task in tasks.iterdir())


def _thread_name(task: Path) -> str:
    try:
        return (task / "comm").read_text().strip()
    except FileNotFoundError:  # the thread ended since the listing
        return ""


if __name__ == "__main__":
    main()
