"""Language-model training throughput: tokens/s, model FLOPs utilisation and peak memory of whole optimizer
steps of the `pile_150m` models (or any preset), through the one training loop (rebased.train) on random
tokens, so the figure is what `rebased train` gets minus reading shards from disk.

Each case trains `steps` optimizer steps and evaluates (a no-op) every `steps // 3`: the rate of the last
third is reported, after compilation, autotuning and the allocator have settled.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from rebased.model import LanguageModel
from rebased.tasks.lm.train import flops_per_token, lm_config, peak_flops
from rebased.train import Meter, TrainConfig, train


@dataclass(frozen=True)
class ThroughputConfig:
    preset: str = "pile_150m"
    option: str = "kind"  # the preset's argument that takes the model names below ("mixer" for tiny)
    models: tuple[str, ...] = ("rebased", "based", "attention")
    seq_lens: tuple[int, ...] = (2048, 8192)
    batch_tokens: int = 65_536  # per optimizer step
    steps: int = 15
    compile: bool = False
    activation_checkpointing: bool = False
    device: str = "cuda"


@dataclass(frozen=True)
class ThroughputRow:
    model: str
    seq_len: int
    batch_tokens: int
    params: int
    tokens_per_s: float
    mfu: float  # NaN where the device's peak is unknown
    step_ms: float
    peak_gib: float


class RandomTokens:
    """rebased.train Examples of uniform random token ids, the same for the same rows."""

    def __init__(self, count: int, seq_len: int, vocab_size: int):
        self.count, self.seq_len, self.vocab_size = count, seq_len, vocab_size

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(int(rows[0]))
        windows = torch.randint(self.vocab_size, (len(rows), self.seq_len + 1), generator=generator)
        return windows[:, :-1], windows[:, 1:]


def time_case(kind: str, seq_len: int, config: ThroughputConfig) -> ThroughputRow:
    torch.manual_seed(0)
    cfg = lm_config(config.preset, **{config.option: kind})
    model = LanguageModel(cfg)
    model.checkpoint_layers = config.activation_checkpointing
    batch = config.batch_tokens // seq_len
    examples = RandomTokens(batch * config.steps, seq_len, cfg.vocab_size)
    every = max(1, config.steps // 3)
    train_config = TrainConfig(
        epochs=1, batch_size=batch, lr=1e-3, schedule="constant", schedule_unit="step", eval_every_steps=every,
        early_stop_metric=None, compile=config.compile, device=config.device,
    )  # fmt: skip
    device = torch.device(config.device)
    meter = Meter(batch * seq_len, batch * seq_len * flops_per_token(cfg, seq_len), peak_flops(device, "bf16", 1))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = train(model, examples, train_config, evaluate=lambda m: {}, progress=False, meter=meter)
    last = result.history[-1]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    row = ThroughputRow(
        kind, seq_len, batch * seq_len, model.num_params(), last["tokens_per_s"], last.get("mfu", float("nan")),
        1e3 * batch * seq_len / last["tokens_per_s"], peak,
    )  # fmt: skip
    del model, result
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def time_training(config: ThroughputConfig, progress=lambda _: None) -> list[ThroughputRow]:
    rows = []
    for seq_len in config.seq_lens:
        for kind in config.models:
            began = time.perf_counter()
            rows.append(time_case(kind, seq_len, config))
            progress(f"{kind} L{seq_len}: {rows[-1].tokens_per_s:,.0f} tokens/s ({time.perf_counter() - began:.0f} s)")
    return rows
