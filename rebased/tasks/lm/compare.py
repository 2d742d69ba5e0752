"""Language-model runs side by side (`rebased compare`): how each trained (steps, tokens, time, final losses),
their scores from `rebased eval` as one table per scored data set, and their loss curves on one plot.

A run folder needs run.json, metrics.jsonl and eval.json; config.json (the model) adds the parameter count.
Weights are not read, so a folder stripped of them (as results/lm keeps its runs) compares the same. A data
set is in-domain for a run when its folder name is the name of the folder the run trained on: runs made on
another machine name the same folders by other paths.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rebased.tables import markdown_table

SUMMARY_FILE = "summary.md"
PLOT_FILE = "loss.png"


@dataclass(frozen=True)
class RunRecord:
    name: str
    run: dict  # run.json
    metrics: list[dict]  # metrics.jsonl, in order
    scores: list[dict]  # eval.json
    parameters: int | None  # from config.json, where the folder has it

    @property
    def trained_on(self) -> str:
        return Path(self.run["data"]).name


def load_record(run_dir: str | Path) -> RunRecord:
    run_dir = Path(run_dir)
    missing = [name for name in ("run.json", "metrics.jsonl", "eval.json") if not (run_dir / name).is_file()]
    if missing:
        fix = " (run `rebased eval` on it first)" if missing == ["eval.json"] else ""
        raise FileNotFoundError(f"{run_dir}: no {', '.join(missing)}: not a scored `rebased train` run{fix}")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return RunRecord(
        name=run_dir.name,
        run=json.loads((run_dir / "run.json").read_text()),
        metrics=[json.loads(line) for line in lines if line.strip()],
        scores=json.loads((run_dir / "eval.json").read_text()),
        parameters=_parameters(run_dir / "config.json"),
    )


def _parameters(config_file: Path) -> int | None:
    if not config_file.is_file():
        return None
    import torch

    from rebased.config import ModelConfig
    from rebased.model import LanguageModel

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = LanguageModel(ModelConfig.from_dict(json.loads(config_file.read_text())["model"]))
    return model.num_params()


def training_table(records: list[RunRecord]) -> str:
    rows = []
    for record in records:
        last = record.metrics[-1] if record.metrics else {}
        validated = [m for m in record.metrics if "val_loss" in m]
        rows.append([
            record.name, "?" if record.parameters is None else f"{record.parameters / 1e6:.1f}M", last.get("step", 0),
            f"{last.get('step', 0) * record.run['batch_tokens'] / 1e6:.1f}M", record.run["seq_len"],
            round(last.get("seconds", float("nan")) / 60, 1), last.get("train_loss", float("nan")),
            validated[-1]["val_loss"] if validated else float("nan"),
        ])  # fmt: skip
    headers = ["run", "parameters", "steps", "tokens", "seq len", "minutes", "last train loss", "last val loss"]
    return markdown_table(headers, rows)


def _score_key(score: dict) -> tuple[str, str, int]:
    return Path(score["data"]).name, score["split"], score["seq_len"]


def score_tables(records: list[RunRecord]) -> str:
    """One table per (data set, split, window), the runs as rows."""
    keys = list(dict.fromkeys(_score_key(score) for record in records for score in record.scores))
    sections = []
    for name, split, seq_len in keys:
        rows = []
        for record in records:
            for score in record.scores:
                if _score_key(score) == (name, split, seq_len):
                    rows.append([record.name, score["ppl/all"], score["ppl/ar"], score["ppl/other"],
                                 score["tokens/all"], score["tokens/ar"] / score["tokens/all"]])  # fmt: skip
        domain = "in-domain" if all(r.trained_on == name for r in records) else "out-of-domain"
        if any(r.trained_on == name for r in records) and domain == "out-of-domain":
            domain = "in-domain for some runs"
        header = f"### {name}, split {split}, windows of {seq_len} tokens ({domain})"
        table = markdown_table(["run", "ppl", "AR ppl", "other ppl", "tokens", "AR share"], rows)
        sections.append(f"{header}\n\n{table}")
    return "\n\n".join(sections)


def plot_curves(records: list[RunRecord], path: Path) -> Path:
    """Training loss of every run against tokens seen, validation losses as points on the same axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for record in records:
        tokens = record.run["batch_tokens"] / 1e6
        line = ax.plot([m["step"] * tokens for m in record.metrics], [m["train_loss"] for m in record.metrics],
                       label=f"{record.name} train", linewidth=1)[0]  # fmt: skip
        validated = [m for m in record.metrics if "val_loss" in m]
        ax.plot([m["step"] * tokens for m in validated], [m["val_loss"] for m in validated], "o--",
                color=line.get_color(), label=f"{record.name} validation")  # fmt: skip
    ax.set(xlabel="training tokens (millions)", ylabel="cross-entropy (nats per token)")
    ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))  # the first steps' losses near ln(vocab) flatten the rest
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def write_comparison(run_dirs: list[str | Path], out: str | Path) -> tuple[Path, Path]:
    """OUT/summary.md (training and score tables) and OUT/loss.png for the runs, in the order given."""
    from rebased.files import atomic_write

    records = [load_record(run_dir) for run_dir in run_dirs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = (
        "## Training\n\n" + training_table(records) + "\n\n## Perplexity (`rebased eval`)\n\n"
        "AR: tokens whose bigram (previous token, token) occurred earlier in their window; AR share: their "
        "fraction of the scored tokens.\n\n" + score_tables(records) + "\n"
    )
    summary = out / SUMMARY_FILE
    atomic_write(summary, lambda f: f.write(text.encode()))
    return summary, plot_curves(records, out / PLOT_FILE)
