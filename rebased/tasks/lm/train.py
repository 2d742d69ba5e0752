"""Language-model training on token shards, through the one training loop (rebased.train).

    examples: the train split's token stream cut into windows of L + 1 tokens, window i = tokens [i L, i L + L]
              (inputs its first L, labels its last L); each epoch visits them in a seeded random order
    schedule: linear warmup over warmup_steps, then cosine from lr to min_lr at the last step
    run folder: run.json (this LMRun), train_config.json, metrics.jsonl, checkpoint.pt (exact resume), and at
              the end model.safetensors + config.json + tokenizer.json (what `rebased generate` and `rebased
              eval` load), loss.png

Validation every eval_every steps on the first eval_tokens of the validation split (always the same windows,
so the curve is comparable along the run): perplexity overall and on associative-recall / other tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from rebased import checkpoint
from rebased.config import ModelConfig
from rebased.model import LanguageModel
from rebased.presets import preset
from rebased.tasks.lm import DataError
from rebased.tasks.lm.evaluate import evaluate_perplexity, first_windows
from rebased.tasks.lm.shards import TokenShards
from rebased.tasks.lm.tokenizers import TOKENIZER_FILE
from rebased.train import Meter, TrainConfig, TrainResult, train
from rebased.train.loop import resolve_device

RUN_FILE = "run.json"
VOCAB_MULTIPLE = 64  # embedding rows are padded to this: cuBLAS has no fast kernels for an odd vocabulary
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks, per GPU


@dataclass(frozen=True)
class LMRun:
    data: str  # a folder `rebased data prepare` wrote
    preset: str = "pile_150m"
    model: dict = field(default_factory=dict)  # the preset's options and ModelConfig fields, e.g. {"kind": "based"}
    seq_len: int = 2048
    batch_tokens: int = 524_288  # global batch per optimizer step, in tokens (seq_len divides it)
    steps: int = 20_000
    warmup_steps: int = 200
    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    grad_accumulation: int = 1
    precision: str = "auto"  # bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    activation_checkpointing: bool = False
    eval_every: int = 500  # optimizer steps between validations
    log_every: int = 10  # optimizer steps between rows of training loss in metrics.jsonl
    eval_tokens: int = 1_048_576  # validation tokens per validation
    eval_batch: int = 8  # windows per validation batch
    checkpoint_every: int = 500
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        for name in ("seq_len", "batch_tokens", "steps", "eval_every", "log_every", "eval_tokens", "eval_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_tokens % self.seq_len:
            raise ValueError(f"batch_tokens={self.batch_tokens} is not a multiple of seq_len={self.seq_len}")

    @property
    def batch_size(self) -> int:
        return self.batch_tokens // self.seq_len

    def train_config(self, windows: int) -> TrainConfig:
        """The loop's settings: steps by step, evaluation by step, no early stop."""
        steps_per_epoch = max(1, windows // self.batch_size)
        return TrainConfig(
            epochs=math.ceil(self.steps / steps_per_epoch), max_steps=self.steps, batch_size=self.batch_size,
            grad_accumulation=self.grad_accumulation, lr=self.lr, min_lr=self.min_lr, weight_decay=self.weight_decay,
            betas=(0.9, 0.95), warmup_steps=self.warmup_steps, schedule="cosine", schedule_unit="step",
            grad_clip=self.grad_clip, precision=self.precision, compile=self.compile, eval_every=10**9,
            eval_every_steps=self.eval_every, log_every_steps=self.log_every, early_stop_metric=None,
            checkpoint_every=self.checkpoint_every,
            seed=self.seed, device=self.device,
        )  # fmt: skip

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class TokenWindows:
    """rebased.train Examples: the token stream of one split, cut into windows of seq_len + 1 tokens that
    overlap by one, so that every token after the first is a label exactly once an epoch."""

    def __init__(self, shards: TokenShards, seq_len: int):
        self.shards, self.seq_len = shards, seq_len
        self.count = (len(shards) - 1) // seq_len
        if self.count < 1:
            raise DataError(f"{shards.folder} {shards.split}: {len(shards):,} tokens, fewer than one window of "
                            f"{seq_len + 1}: lower seq_len or prepare more text")  # fmt: skip

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        windows = np.stack([self.shards.tokens(int(row) * self.seq_len, self.seq_len + 1) for row in rows])
        windows = torch.from_numpy(windows.astype(np.int64))
        return windows[:, :-1], windows[:, 1:]


def padded_vocab(vocab_size: int) -> int:
    """The tokenizer's vocabulary rounded up to VOCAB_MULTIPLE. The extra rows are never a target, so the
    model learns to give them no mass. With GPT-NeoX's 50,277 (an odd leading dimension) cuBLAS took a slow
    kernel for the LM head's three matmuls; padded to 50,304, a pile_150m training step on the H200 went from
    320 to 222 ms (benchmarks/results/h200_lm)."""
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def lm_config(name: str, tokenizer_vocab: int | None = None, **options) -> ModelConfig:
    """The preset with options, as `rebased train` builds it: the vocabulary (the tokenizer's, else the preset's
    own) padded by padded_vocab, unless the options set one."""
    if "vocab_size" not in options:
        unpadded = preset(name, **options).vocab_size if tokenizer_vocab is None else tokenizer_vocab
        options["vocab_size"] = padded_vocab(unpadded)
    return preset(name, **options)


def build_model(run: LMRun, vocab_size: int) -> LanguageModel:
    """The preset with the run's options and the tokenizer's vocabulary (lm_config)."""
    cfg = lm_config(run.preset, vocab_size, **run.model)
    check_model_fits(cfg, run.seq_len, vocab_size)
    torch.manual_seed(run.seed)  # the initial weights: a run and its rerun start alike
    return LanguageModel(cfg)


def check_model_fits(cfg: ModelConfig, seq_len: int, vocab_size: int) -> None:
    if cfg.vocab_size < vocab_size:
        raise ValueError(f"the model's vocab_size {cfg.vocab_size} is smaller than the tokenizer's {vocab_size}: "
                         "token ids beyond it have no embedding; drop the vocab_size override")  # fmt: skip
    if 0 < cfg.max_position_embeddings < seq_len:
        raise ValueError(f"seq_len {seq_len} is beyond the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}: lower seq_len or raise max_position_embeddings")  # fmt: skip


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3 forward): 2 per weight of every matmul (the
    tied head included, the embedding lookups not), plus each mixer's work along time: 2 T d per softmax
    attention layer (causal: T/2 keys on average, scores and values), 4 F d per linear-attention layer (the
    state's update and read-out with F features per head). Recomputation is not counted, as in MFU's usual
    definition."""
    model = torch.device("meta")
    with model:
        params = LanguageModel(cfg).num_params(exclude_embeddings=True)
    forward = 2 * (params + cfg.d_model * cfg.vocab_size)
    for name in cfg.layer_mixers():
        mixer = cfg.mixers[name]
        if name in ("attention", "sliding_window"):
            forward += 2 * min(seq_len, getattr(mixer, "window", 0) or seq_len) * cfg.d_model
        elif hasattr(mixer, "feature_dim"):
            features = mixer.feature_dim**2 + (mixer.feature_dim + 1 if name == "based" else 0)
            forward += 4 * features * cfg.d_model
    return 3.0 * forward


def peak_flops(device: torch.device, precision: str, world: int) -> float:
    if device.type != "cuda" or precision == "fp32":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return world * next((peak for gpu, peak in PEAK_BF16_FLOPS.items() if gpu in name), 0.0)


def validation(run: LMRun, data: Path):
    """evaluate(model) for the loop: perplexity on the first eval_tokens of the validation split."""
    shards = TokenShards(data, "val")
    windows = max(1, run.eval_tokens // run.seq_len)

    def evaluate(model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        batches = first_windows(shards, run.seq_len, run.eval_batch, windows)
        result = evaluate_perplexity(model, batches, device=device)
        return {"val_loss": math.log(result["ppl/all"])} | {
            f"val_{name.removeprefix('ppl/')}_ppl": value for name, value in result.items() if name.startswith("ppl/")
            and "pos" not in name
        }  # fmt: skip

    return evaluate


def train_lm(run: LMRun, run_dir: str | Path, *, progress: bool = True) -> TrainResult:
    """Train (or resume) the run in run_dir; at the end the model, its config and tokenizer are saved there."""
    run_dir, data = Path(run_dir), Path(run.data)
    shards = TokenShards(data, "train")
    model = build_model(run, shards.vocab_size)
    evaluate = validation(run, data)  # opens the validation split: a folder without one fails before run.json
    _write_run_file(run_dir, run)
    model.checkpoint_layers = run.activation_checkpointing
    examples = TokenWindows(shards, run.seq_len)
    config = run.train_config(len(examples))
    device = resolve_device(run.device)
    precision = "bf16" if run.precision == "auto" and device.type == "cuda" else run.precision
    world = int(os.environ.get("WORLD_SIZE", "1"))
    meter = Meter(
        run.batch_tokens,
        run.batch_tokens * flops_per_token(model.cfg, run.seq_len),
        peak_flops(device, precision, world),
    )
    result = train(model, examples, config, run_dir, evaluate=evaluate, progress=progress, meter=meter)
    if result.finished and _is_rank_zero():
        checkpoint.save(model, run_dir, {"run": run.to_dict()})
        shutil.copyfile(data / TOKENIZER_FILE, run_dir / TOKENIZER_FILE)
        plot_losses(run_dir)
    return result


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _write_run_file(run_dir: Path, run: LMRun) -> None:
    """run.json: what `rebased train RUN_DIR` resumes from; a different run in the same folder is refused."""
    path = run_dir / RUN_FILE
    if path.exists():
        stored = json.loads(path.read_text())
        if stored != json.loads(json.dumps(run.to_dict())):
            changed = sorted(k for k in stored if stored.get(k) != run.to_dict().get(k))
            raise ValueError(f"{path} holds another run (differs in {', '.join(changed)}): choose another --out")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run.to_dict(), indent=2) + "\n")


def load_run(run_dir: str | Path) -> LMRun:
    path = Path(run_dir) / RUN_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {RUN_FILE} in {run_dir}: not a language-model run folder")
    return LMRun(**json.loads(path.read_text()))


def plot_losses(run_dir: str | Path) -> Path | None:
    """loss.png: training loss and validation loss against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    if not entries:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([e["step"] for e in entries], [e["train_loss"] for e in entries], label="train")
    validated = [e for e in entries if "val_loss" in e]
    ax.plot([e["step"] for e in validated], [e["val_loss"] for e in validated], "o-", label="validation")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats per token)", title=run_dir.name)
    ax.legend()
    ax.grid(alpha=0.3)
    path = run_dir / "loss.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
