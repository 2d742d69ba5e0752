"""The MQAR benchmark: train and evaluate a grid of runs, resume a stopped sweep, summarise, plot.

A run's score is its best test accuracy over epochs (as the paper reports); a cell (model, d_model, L)
takes the learning rate with the best mean over seeds, and reports that mean and its standard deviation.
results.jsonl holds one line per finished run; a sweep that stops resumes by skipping those.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import multiprocessing
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch

from rebased import checkpoint
from rebased.config import mixer_config
from rebased.model import LanguageModel
from rebased.presets import mqar_model
from rebased.tables import markdown_table
from rebased.tasks.mqar.data import MQARSplits, make_mqar_splits
from rebased.tasks.mqar.grids import ABLATION_KERNELS, MQARRun
from rebased.train import TrainConfig, train
from rebased.train.evaluate import accuracy_by_slice

log = logging.getLogger(__name__)
MICRO_BATCH_TOKENS = 512 * 512  # gradient accumulation keeps a micro-batch at or under this many tokens


def build_model(run: MQARRun) -> LanguageModel:
    """Named mixers use their MQAR preset; the other kernel-ablation names are linear attention with that map."""
    max_len = max((length for length, _ in run.train_mix + run.test_mix), default=run.seq_len)
    positions = max_len if run.position_embeddings else 0
    if run.model in ABLATION_KERNELS and run.model not in ("rebased", "based"):
        cfg = mqar_model("linear_attention", run.d_model, max_len)
        mixer = mixer_config("linear_attention", num_heads=12, feature_dim=16, feature_map=run.model)
        cfg = cfg.replace(mixers={"linear_attention": mixer})
    else:
        cfg = mqar_model(run.model, run.d_model, max_len)
    return LanguageModel(cfg.replace(vocab_size=run.vocab_size, max_position_embeddings=positions))


def make_data(run: MQARRun) -> MQARSplits:
    train_mix = run.train_mix or ((run.seq_len, run.num_kv_pairs),)
    test_mix = run.test_mix or train_mix
    share = lambda mix, total: [(length, pairs, total // len(mix)) for length, pairs in mix]  # noqa: E731
    return make_mqar_splits(
        share(train_mix, run.train_examples), share(test_mix, run.test_examples),
        vocab_size=run.vocab_size, seed=run.data_seed,
    )  # fmt: skip


def train_config(run: MQARRun) -> TrainConfig:
    """PAPER.md: AdamW, weight decay 0.1, cosine decay per epoch, no warmup, early stop above 0.99."""
    longest = max([run.seq_len, *(length for length, _ in run.train_mix)])
    accumulation = max(1, math.ceil(run.batch_size * longest / MICRO_BATCH_TOKENS))
    while run.batch_size % accumulation:
        accumulation += 1
    return TrainConfig(
        epochs=run.epochs, batch_size=run.batch_size, grad_accumulation=accumulation, lr=run.lr,
        weight_decay=0.1, schedule="cosine", schedule_unit="epoch", early_stop_metric="accuracy",
        early_stop_threshold=0.99, seed=run.seed,
    )  # fmt: skip


def run_one(
    run: MQARRun, data: MQARSplits, run_dir: Path | None = None, *, progress: bool = False,
    stop_at: float | None = None,
) -> dict | None:  # fmt: skip
    """Train and evaluate one run; its result line, or None when it stopped at stop_at (time.monotonic()),
    checkpointed in run_dir, where the next call with the same run_dir resumes it."""
    torch.manual_seed(run.seed)  # the model's initial weights
    model = build_model(run)
    test = data.test
    slices = {s.name: (s.start, s.stop) for s in test.slices}
    config = train_config(run)
    device = "cuda" if config.device == "auto" and torch.cuda.is_available() else "cpu"
    evaluate = lambda m: accuracy_by_slice(m, test.inputs, test.labels, slices, device=device)  # noqa: E731
    train_data = (data.train.inputs, data.train.labels)
    result = train(model, train_data, config, run_dir, evaluate=evaluate, progress=progress, stop_at=stop_at)
    if not result.finished:
        return None
    if run_dir is not None:  # the final weights, loadable by `rebased generate` and the analyses
        checkpoint.save(model, run_dir, extra={"mqar_run": dataclasses.asdict(run)})
    best = result.best
    return {
        "run_id": run.run_id,
        **dataclasses.asdict(run),
        "accuracy": best.get("accuracy", float("nan")),
        "loss": best.get("loss", float("nan")),
        "best_epoch": best.get("epoch"),
        "slices": {k.split("/", 1)[1]: v for k, v in best.items() if k.startswith("accuracy/")},
        "final_accuracy": result.history[-1].get("accuracy") if result.history else None,
        "stopped_early": result.stopped_early,
        "steps": result.steps,
        "params": model.num_params(),
        "state_bytes": model.state_size(run.seq_len).bytes,
        "seconds": result.seconds,  # training time, summed over the calls a resumed run took
        "device": device,
    }


def load_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stored_results(runs: Sequence[MQARRun], path: Path) -> list[dict]:
    """The lines of results.jsonl that belong to `runs`. A line with a run's id but other settings (a smoke
    test with --set epochs=1 written to the same folder, say) is an error, not a result to reuse."""
    by_id = {run.run_id: json.loads(json.dumps(dataclasses.asdict(run))) for run in runs}  # tuples as lists
    kept = []
    for result in load_results(path):
        settings = by_id.get(result["run_id"])
        if settings is None:
            continue
        changed = sorted(k for k, v in settings.items() if k in result and result[k] != v)
        if changed:
            theirs = ", ".join(f"{k}={result[k]!r} (now {settings[k]!r})" for k in changed)
            raise ValueError(f"{path} holds {result['run_id']} trained with other settings: {theirs}; use another out")
        kept.append(result)
    return kept


def _data_key(run: MQARRun) -> tuple:
    return (run.seq_len, run.num_kv_pairs, run.vocab_size, run.train_examples, run.test_examples,
            run.train_mix, run.test_mix, run.data_seed)  # fmt: skip


def pending_runs(runs: Sequence[MQARRun], results: Sequence[dict]) -> list[MQARRun]:
    """The runs without a result, in the order a sweep trains them: cheapest first (short L, small d_model),
    so a time-boxed call finishes whole cells of every model before it reaches the long runs. Stable, so
    the grid's order holds within an (L, d_model) pair."""
    done = {r["run_id"] for r in results}
    longest = lambda run: max([run.seq_len, *(length for length, _ in run.train_mix)])  # noqa: E731
    return sorted((run for run in runs if run.run_id not in done), key=lambda run: (longest(run), run.d_model))


def _train_in_worker(run: MQARRun, run_dir: Path, threads: int, stop_at: float | None) -> dict | None:
    """One run in a worker process: its own data (the fast generator takes seconds) and CPU threads.
    time.monotonic() is system-wide on Linux, so the parent's deadline means the same instant here."""
    torch.set_num_threads(threads)
    return run_one(run, make_data(run), run_dir, stop_at=stop_at)


def run_sweep(
    runs: Sequence[MQARRun], out_dir: str | Path, *, workers: int = 1, progress: bool = True,
    time_limit: float | None = None,
    on_result: Callable[[dict, int, int], None] = lambda result, done, total: None,
) -> list[dict]:  # fmt: skip
    """Train every run not yet in out_dir/results.jsonl and return the results of `runs`.

    Runs go cheapest first (by L, then d_model). workers > 1 trains that many runs at once in separate
    processes (on one H200 at the paper's batch this gained 1.0-1.4x: benchmarks/results/h200_mqar). With
    one worker, data is generated once per distinct task. time_limit (seconds): start no run after it has
    passed, and stop a run still training then at its next optimizer step, checkpointed in
    out_dir/runs/RUN_ID; the next call skips the runs in results.jsonl and resumes the checkpointed ones.
    """
    deadline = math.inf if time_limit is None else time.monotonic() + time_limit
    stop_at = None if time_limit is None else deadline
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.jsonl"
    results = stored_results(runs, results_path)
    todo = pending_runs(runs, results)

    def record(result: dict) -> None:
        with results_path.open("a") as handle:  # one line per finished run: the sweep's resume point
            handle.write(json.dumps(result) + "\n")
        results.append(result)
        on_result(result, len(results), len(runs))

    if workers <= 1:
        data_cache: dict[tuple, MQARSplits] = {}
        for run in todo:
            if time.monotonic() > deadline:
                break
            if _data_key(run) not in data_cache:
                data_cache.clear()  # one task's data in memory at a time
                data_cache[_data_key(run)] = make_data(run)
            run_dir = out_dir / "runs" / run.run_id
            result = run_one(run, data_cache[_data_key(run)], run_dir, progress=progress, stop_at=stop_at)
            if result is not None:
                record(result)
        _log_left(runs, results)
        return results
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked into workers
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(_train_in_worker, run, out_dir / "runs" / run.run_id, threads, stop_at) for run in todo]
        for future in as_completed(futures):
            if future.cancelled():
                continue
            if (result := future.result()) is not None:
                record(result)
            if time.monotonic() > deadline:  # runs not started yet are dropped; running ones checkpoint
                for pending in futures:
                    pending.cancel()
    _log_left(runs, results)
    return results


def _log_left(runs: Sequence[MQARRun], results: Sequence[dict]) -> None:
    if len(results) < len(runs):
        log.warning("%d runs left for the next call (a run stopped by the time limit resumes from its checkpoint)",
                    len(runs) - len(results))  # fmt: skip


@dataclass
class CellSummary:
    model: str
    d_model: int
    seq_len: int
    best_lr: float
    mean: float
    std: float
    seeds: int
    missing: int = 0  # planned runs of this cell (any lr, any seed) not finished yet: the best lr may change

    def text(self) -> str:
        pending = f", {self.missing} runs pending" if self.missing else ""
        return f"{self.mean:.3f} ± {self.std:.3f} (lr {self.best_lr:g}{pending})"


def summarise(results: Sequence[dict], planned: Sequence[MQARRun] = ()) -> list[CellSummary]:
    """Best lr per cell (by mean over seeds), its mean and std; `planned` (the sweep's runs) lets a cell say
    how many of its runs are still missing."""
    by_cell: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        by_cell[(r["model"], r["d_model"], r["seq_len"])][r["lr"]].append(r["accuracy"])
    done = {r["run_id"] for r in results}
    missing = defaultdict(int)
    for run in planned:
        missing[run.cell] += run.run_id not in done
    cells = []
    for (model, d_model, seq_len), by_lr in by_cell.items():
        lr, scores = max(by_lr.items(), key=lambda item: statistics.fmean(item[1]))
        std = statistics.stdev(scores) if len(scores) > 1 else 0.0
        mean, pending = statistics.fmean(scores), missing[(model, d_model, seq_len)]
        cells.append(CellSummary(model, d_model, seq_len, lr, mean, std, len(scores), pending))
    return sorted(cells, key=lambda c: (c.model, c.seq_len, c.d_model))


def summary_markdown(cells: Sequence[CellSummary]) -> str:
    """Rows (model, L), columns d_model: mean accuracy +- std over seeds at the best lr."""
    d_models = sorted({c.d_model for c in cells})
    rows: dict[tuple, dict[int, CellSummary]] = defaultdict(dict)
    for c in cells:
        rows[(c.model, c.seq_len)][c.d_model] = c
    table = []
    for (model, seq_len), by_d in sorted(rows.items(), key=lambda item: (item[0][1], item[0][0])):
        table.append([model, seq_len, *("-" if by_d.get(d) is None else by_d[d].text() for d in d_models)])
    return markdown_table(["model", "L", *(f"d_model {d}" for d in d_models)], table)


def paper_comparison(cells: Sequence[CellSummary], paper: dict[tuple[str, int], dict[int, float]]) -> str:
    """Ours beside the paper, one row per finished cell both have: ours, paper, difference, and a flag where
    they differ by more than CLOSE. Empty when no cell is in both."""
    from rebased.tasks.mqar.paper_values import CLOSE

    rows = []
    for c in sorted(cells, key=lambda c: (c.seq_len, c.model, c.d_model)):
        theirs = paper.get((c.model, c.seq_len), {}).get(c.d_model)
        if theirs is not None and not c.missing:
            diff = c.mean - theirs
            flag = f"differs by more than {CLOSE}" if abs(diff) > CLOSE else ""
            rows.append([c.model, c.seq_len, c.d_model, f"{c.mean:.3f}", f"{theirs:.2f}", f"{diff:+.3f}", flag])
    if not rows:
        return ""
    return markdown_table(["model", "L", "d_model", "ours", "paper", "ours - paper", ""], rows)


def plot_summary(cells: Sequence[CellSummary], path: str | Path) -> Path | None:
    """Accuracy against d_model, one panel per L, one line per model (the paper's Fig. 1 layout)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot")
        return None
    lengths = sorted({c.seq_len for c in cells})
    models = sorted({c.model for c in cells})
    colours = {model: f"C{i}" for i, model in enumerate(models)}  # one colour per model in every panel
    fig, axes = plt.subplots(1, len(lengths), figsize=(3.2 * len(lengths), 3.0), sharey=True, squeeze=False)
    for ax, length in zip(axes[0], lengths):
        for model in models:
            points = sorted(
                (c.d_model, c.mean, c.std, c.missing) for c in cells if c.model == model and c.seq_len == length
            )
            if not points:
                continue
            d, mean, std, missing = zip(*points)
            ax.errorbar(d, mean, yerr=std, marker="o", capsize=2, color=colours[model], label=model)
            pending = [(x, y) for x, y, m in zip(d, mean, missing) if m]
            if pending:  # hollow marker: this cell still has runs to train, its best lr may change
                ax.plot(*zip(*pending), "o", markersize=9, markerfacecolor="white", color=colours[model])
        ax.set_xscale("log", base=2)
        ax.set_title(f"L = {length}")
        ax.set_xlabel("d_model")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MQAR accuracy")
    handles = [plt.Line2D([], [], color=colours[m], marker="o", label=m) for m in models]
    if any(c.missing for c in cells):
        handles.append(
            plt.Line2D([], [], color="grey", marker="o", markerfacecolor="white", ls="", label="runs pending")
        )
    axes[0][-1].legend(handles=handles, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
