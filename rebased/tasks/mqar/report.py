"""What a sweep's results say: per-cell summaries (best lr, mean and spread over seeds, runs pending), the
markdown table, the comparison with the paper's values, the cells still to train, and the figure (learning
curves for a one-cell experiment, accuracy against d_model or L for a grid)."""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rebased.tables import markdown_table
from rebased.tasks.mqar.grids import MQARRun, display_name, model_order
from rebased.train.run_files import METRICS_FILE

log = logging.getLogger(__name__)


Paper = dict[tuple[str, int], dict[int, float]]  # (model, L) -> {d_model: accuracy}, as in paper_values


@dataclass
class CellSummary:
    model: str
    d_model: int
    seq_len: int
    best_lr: float
    mean: float
    std: float  # over seeds; 0.0 for one seed, which has no spread to show
    seeds: int
    missing: int = 0  # planned runs of this cell (any lr, any seed) not finished yet: the best lr may change

    def text(self) -> str:
        spread = f" ± {self.std:.3f}" if self.seeds > 1 else ""
        pending = f", {self.missing} run{'s' if self.missing > 1 else ''} pending" if self.missing else ""
        return f"{self.mean:.3f}{spread} (lr {self.best_lr:g}{pending})"


def summarise(results: Sequence[dict], planned: Sequence[MQARRun] = ()) -> list[CellSummary]:
    """Best lr per cell (by mean over seeds), its mean and std; `planned` (the sweep's runs) lets a cell say
    how many of its runs are still missing. Sorted by model (DISPLAY_NAMES order), L, d_model."""
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
    return sorted(cells, key=lambda c: (model_order(c.model), c.seq_len, c.d_model))


def summary_caption(cells: Sequence[CellSummary]) -> str:
    """What the numbers of summary_markdown are, in one sentence."""
    seeds = sorted({c.seeds for c in cells})
    if seeds == [1]:
        return "Best test accuracy of one seed per cell, at the best learning rate per cell."
    one = " (no spread where a cell has one seed)" if 1 in seeds else ""
    return (
        f"Best test accuracy per run, mean ± std over {'/'.join(map(str, seeds))} seeds at the best learning "
        f"rate per cell{one}."
    )


def summary_markdown(cells: Sequence[CellSummary]) -> str:
    """Rows (model, L), columns d_model: mean accuracy ± std over seeds at the best lr."""
    d_models = sorted({c.d_model for c in cells})
    rows: dict[tuple, dict[int, CellSummary]] = defaultdict(dict)
    for c in cells:
        rows[(c.model, c.seq_len)][c.d_model] = c
    table = []
    for (model, seq_len), by_d in sorted(rows.items(), key=lambda item: (item[0][1], model_order(item[0][0]))):
        cells_text = ("-" if by_d.get(d) is None else by_d[d].text() for d in d_models)
        table.append([display_name(model), seq_len, *cells_text])
    return markdown_table(["model", "L", *(f"d_model {d}" for d in d_models)], table)


def paper_comparison(cells: Sequence[CellSummary], paper: Paper) -> str:
    """Ours beside the paper, one row per finished cell both have: ours, paper, difference, and a flag where
    they differ by more than CLOSE. Empty when no cell is in both."""
    from rebased.tasks.mqar.paper_values import CLOSE

    rows = []
    for c in sorted(cells, key=lambda c: (c.seq_len, model_order(c.model), c.d_model)):
        theirs = paper.get((c.model, c.seq_len), {}).get(c.d_model)
        if theirs is not None and not c.missing:
            diff = c.mean - theirs
            flag = f"differs by more than {CLOSE}" if abs(diff) > CLOSE else ""
            row = [display_name(c.model), c.seq_len, c.d_model, f"{c.mean:.3f}", f"{theirs:.2f}", f"{diff:+.3f}", flag]
            rows.append(row)
    if not rows:
        return ""
    return markdown_table(["model", "L", "d_model", "ours", "paper", "ours - paper", "note"], rows)


def pending_cells(planned: Sequence[MQARRun], results: Sequence[dict], paper: Paper) -> str:
    """The cells with runs still to train, in the order a sweep trains them (cheapest first): runs finished of
    those planned, and the paper's value where it has one. Empty when nothing is pending."""
    done = {r["run_id"] for r in results}
    planned_by_cell: dict[tuple, list[MQARRun]] = defaultdict(list)
    for run in planned:
        planned_by_cell[run.cell].append(run)
    rows = []
    by_cost = sorted(planned_by_cell.items(), key=lambda item: (item[0][2], item[0][1], model_order(item[0][0])))
    for (model, d_model, seq_len), runs in by_cost:
        finished = sum(run.run_id in done for run in runs)
        if finished < len(runs):
            theirs = paper.get((model, seq_len), {}).get(d_model)
            rows.append([display_name(model), seq_len, d_model, f"{finished} of {len(runs)}",
                         "" if theirs is None else f"{theirs:.2f}"])  # fmt: skip
    if not rows:
        return ""
    return markdown_table(["model", "L", "d_model", "runs finished", "paper"], rows)


def training_time(results: Sequence[dict]) -> str:
    """Where the training time went, by device and task size (L, d_model): finished runs, their optimizer steps,
    mean minutes a run, ms a step (what a faster step shows up in), the evaluations' share of that time (runs
    that recorded eval_seconds) and run-hours in all. A run's seconds are its own wall time in train(),
    evaluations included; runs trained side by side (--workers, shards on one GPU) overlap, so their run-hours
    add up to more than the device spent."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        if "seconds" in r and "steps" in r:
            groups[(r.get("device", "?"), r["seq_len"], r["d_model"])].append(r)
    if not groups:
        return ""
    rows = []
    for (device, seq_len, d_model), runs in sorted(groups.items()):
        seconds, steps = sum(r["seconds"] for r in runs), sum(r["steps"] for r in runs)
        timed = [r for r in runs if "eval_seconds" in r]
        evals = sum(r["eval_seconds"] for r in timed) / max(sum(r["seconds"] for r in timed), 1e-9)
        rows.append([device, seq_len, d_model, len(runs), steps, f"{seconds / 60 / len(runs):.1f}",
                     f"{1e3 * seconds / max(steps, 1):.1f}", f"{100 * evals:.0f}% of {len(timed)}" if timed else "-",
                     f"{seconds / 3600:.2f}"])  # fmt: skip
    hours = sum(r["seconds"] for runs in groups.values() for r in runs) / 3600
    count = sum(len(runs) for runs in groups.values())
    headers = ["device", "L", "d_model", "runs", "steps", "min / run", "ms / step", "evaluating", "run-hours"]
    return f"{markdown_table(headers, rows)}\n\n{count} runs, {hours:.2f} run-hours in all.\n"


RECENT_RUNS = 4  # an estimate's time a step: the median of a shape's latest finished runs (later code runs faster)
QUADRATIC_MODELS = ("attention",)  # their step time does not scale with L as the linear-time models' does


def step_seconds(results: Sequence[dict]) -> dict[tuple, float]:
    """(device, model, L, d_model) -> seconds a step, evaluations included: the median over that shape's latest
    RECENT_RUNS finished runs (results.jsonl holds them in the order they finished)."""
    seen: dict[tuple, list[float]] = defaultdict(list)
    for r in results:
        if r.get("steps") and "seconds" in r:
            seen[(r.get("device", "?"), r["model"], r["seq_len"], r["d_model"])].append(r["seconds"] / r["steps"])
    return {key: statistics.median(values[-RECENT_RUNS:]) for key, values in seen.items()}


@dataclass
class Estimate:
    seconds: float  # if the run trains all its steps
    scaled_from: int | None = None  # the L whose step time, times L / that L, this comes from (None: its own L)

    def text(self, device: str) -> str:
        scaled = f" (from L {self.scaled_from})" if self.scaled_from else ""
        return f"{self.seconds / 60:.1f} min on {device}{scaled}"


def estimate_run(run: MQARRun, device: str, times: dict[tuple, float]) -> Estimate | None:
    """The run's time on device from finished runs of its model and d_model: at its L, else (linear-time models)
    the nearest L's step time scaled by L, as their cost a token is the same at every L; None without either."""
    steps = run.epochs * (run.train_examples // run.batch_size)
    own = times.get((device, run.model, run.seq_len, run.d_model))
    if own is not None:
        return Estimate(own * steps)
    if run.model in QUADRATIC_MODELS:
        return None
    lengths = [key[2] for key in times if key[:2] == (device, run.model) and key[3] == run.d_model]
    if not lengths:
        return None
    nearest = min(lengths, key=lambda length: abs(math.log(length / run.seq_len)))
    per_step = times[(device, run.model, nearest, run.d_model)] * run.seq_len / nearest
    return Estimate(per_step * steps, scaled_from=nearest)


def estimate_lines(pending: Sequence[MQARRun], results: Sequence[dict]) -> tuple[list[str], str]:
    """The dry run's listing, each pending run with its time per device that finished runs (if it trains all its
    steps: an early stop takes less), and the totals line ("" when no finished run gives a time)."""
    times = step_seconds(results)
    devices = sorted({key[0] for key in times})
    estimates = {device: [estimate_run(run, device, times) for run in pending] for device in devices}
    width = max((len(run.run_id) for run in pending), default=0)
    lines = []
    for i, run in enumerate(pending):
        known = [estimate.text(device) for device, per_run in estimates.items() if (estimate := per_run[i])]
        lines.append(f"  {run.run_id:{width}}   {', '.join(known)}".rstrip() if known else f"  {run.run_id}")
    totals = []
    for device, per_run in estimates.items():
        known = [e.seconds for e in per_run if e is not None]
        if known:
            unknown = len(per_run) - len(known)
            rest = f", {unknown} more with no finished run of their model and d_model to go by" if unknown else ""
            runs = f"{len(known)} run{'s' if len(known) > 1 else ''}"
            totals.append(f"{sum(known) / 3600:.1f} hours on {device} for {runs}{rest}")
    return lines, "; ".join(totals)


@dataclass
class Curve:
    """One run's evaluations, from its metrics.jsonl: test accuracy and mean training loss at each step."""

    model: str
    seed: int
    steps: list[int]
    accuracy: list[float]
    train_loss: list[float]


def learning_curves(results: Sequence[dict], cells: Sequence[CellSummary], runs_dir: str | Path) -> list[Curve]:
    """The curves of each cell's runs at its best lr (the runs its table entry averages), read from
    runs_dir/RUN_ID/metrics.jsonl, by model (DISPLAY_NAMES order) and seed; runs without the file are left out."""
    best = {(c.model, c.d_model, c.seq_len): c.best_lr for c in cells}
    curves = []
    for r in results:
        if best.get((r["model"], r["d_model"], r["seq_len"])) != r["lr"]:
            continue
        path = Path(runs_dir) / r["run_id"] / METRICS_FILE
        if not path.exists():
            continue
        entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        entries = [e for e in entries if "accuracy" in e and "step" in e]
        steps, accuracy, loss = ([e[k] for e in entries] for k in ("step", "accuracy", "train_loss"))
        curves.append(Curve(r["model"], r["seed"], steps, accuracy, loss))
    return sorted(curves, key=lambda c: (model_order(c.model), c.seed))


def plot_summary(
    cells: Sequence[CellSummary],
    path: str | Path,
    results: Sequence[dict] = (),
    runs_dir: str | Path | None = None,
    paper: Paper | None = None,
    planned: Sequence[MQARRun] = (),
) -> Path | None:
    """summary_figure() written to `path`; None without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("matplotlib is not installed: no plot")
        return None
    summary_figure(cells, results, runs_dir, paper, planned).savefig(path, dpi=120)
    return Path(path)


def summary_figure(
    cells: Sequence[CellSummary],
    results: Sequence[dict] = (),
    runs_dir: str | Path | None = None,
    paper: Paper | None = None,
    planned: Sequence[MQARRun] = (),
):
    """The figure that says most about these cells: for one (d_model, L) cell, where accuracy at one x
    position would repeat the table, its learning curves (curves_figure, from runs_dir's metrics.jsonl when
    there); for several d_models, accuracy against d_model per L (the paper's Fig. 1 layout); for one
    d_model at several L, accuracy against L. Accuracy figures draw the paper's values beside ours, over every
    planned cell, so a length with nothing finished yet still has its panel."""
    grid = {(c.model, c.d_model, c.seq_len) for c in cells} | {run.cell for run in planned}
    if len({(d, length) for _, d, length in grid}) == 1 and runs_dir is not None:
        curves = learning_curves(results, cells, runs_dir)
        if curves:
            return curves_figure(curves, cells)
    several_d = len({d for _, d, _ in grid}) > 1 or len({length for _, _, length in grid}) == 1
    return accuracy_figure(cells, "d_model" if several_d else "seq_len", paper or {}, sorted(grid))


def _plain(value: float, position=None) -> str:
    return f"{value:g}"


def _colours(models: Sequence[str]) -> dict[str, str]:
    """One colour per model, the same in every panel, in DISPLAY_NAMES order."""
    return {model: f"C{i}" for i, model in enumerate(sorted(set(models), key=model_order))}


def curves_figure(curves: Sequence[Curve], cells: Sequence[CellSummary]):
    """Test accuracy (left) and mean training loss since the previous evaluation (right, log scale) against
    the optimizer step: one line per run, one colour per model, labelled once. Lines carry gid MODEL/sSEED."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import LogLocator, NullFormatter

    colours = _colours([c.model for c in curves])
    figure = Figure(figsize=(10.0, 3.4), layout="constrained")
    accuracy_ax, loss_ax = figure.subplots(1, 2)
    for curve in curves:
        style = dict(color=colours[curve.model], marker="o", markersize=3, alpha=0.85)
        style["gid"] = f"{curve.model}/s{curve.seed}"
        accuracy_ax.plot(curve.steps, curve.accuracy, **style)
        loss_ax.plot(curve.steps, curve.train_loss, **style)
    accuracy_ax.axhline(0.99, color="grey", lw=0.8, ls=":")  # the early stop: a run ends once above it
    accuracy_ax.set(xlabel="step", ylabel="test accuracy", ylim=(-0.02, 1.02))
    loss_ax.set(xlabel="step", ylabel="train loss", yscale="log")
    loss_ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    loss_ax.yaxis.set_major_formatter(_plain)
    loss_ax.yaxis.set_minor_formatter(NullFormatter())
    for ax in (accuracy_ax, loss_ax):
        ax.grid(alpha=0.3)
    seeds = {model: sum(c.model == model for c in curves) for model in colours}
    handles = [Line2D([], [], color=colours[m], marker="o", label=f"{display_name(m)} ({seeds[m]} seeds)"
                      if seeds[m] > 1 else display_name(m)) for m in colours]  # fmt: skip
    handles.append(Line2D([], [], color="grey", lw=0.8, ls=":", label="early stop (0.99)"))
    figure.legend(handles=handles, fontsize=8, loc="outside right upper")
    cell = cells[0]
    lrs = sorted({c.best_lr for c in cells})
    lr = f"lr {lrs[0]:g}" if len(lrs) == 1 else "each model at its best lr"
    figure.suptitle(f"MQAR, L {cell.seq_len}, d_model {cell.d_model} ({lr}): one line per seed", fontsize=10)
    return figure


def accuracy_figure(cells: Sequence[CellSummary], x: str, paper: Paper, grid: Sequence[tuple]):
    """Accuracy against x ("d_model": one panel per L, as the paper's Fig. 1; "seq_len": one panel), one line
    per model (gid MODEL), ± std over seeds where a cell has more than one; hollow markers on cells with runs
    still pending; the paper's values at the cells of `grid` ((model, d_model, L) of every cell planned or
    finished: summary_figure's) as a dashed line per model (gid paper/MODEL)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    panels = sorted({length for _, _, length in grid}) if x == "d_model" else [None]
    colours = _colours([model for model, _, _ in grid])
    figure = Figure(figsize=(3.2 * len(panels) if x == "d_model" else 4.5, 3.0))
    axes = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, length in zip(axes, panels):
        for model in colours:
            theirs = sorted(
                ({"d_model": d, "seq_len": n}[x], paper[(model, n)][d])
                for m, d, n in grid
                if m == model and (length is None or n == length) and d in paper.get((model, n), {})
            )
            if theirs:
                ax.plot(*zip(*theirs), ls="--", marker="x", lw=1, color=colours[model], alpha=0.6,
                        gid=f"paper/{model}")  # fmt: skip
            mine = [c for c in cells if c.model == model and (length is None or c.seq_len == length)]
            if not mine:
                continue
            mine.sort(key=lambda c: getattr(c, x))
            xs, means = [getattr(c, x) for c in mine], [c.mean for c in mine]
            spread = [c.std if c.seeds > 1 else 0.0 for c in mine] if any(c.seeds > 1 for c in mine) else None
            line = ax.errorbar(xs, means, yerr=spread, marker="o", capsize=2, color=colours[model]).lines[0]
            line.set_gid(model)  # the means' line (not its caps)
            pending = [(c_x, c.mean) for c_x, c in zip(xs, mine) if c.missing]
            if pending:  # hollow marker: this cell still has runs to train, its best lr may change
                ax.plot(*zip(*pending), "o", markersize=9, markerfacecolor="white", color=colours[model])
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({d if x == "d_model" else n for _, d, n in grid}), minor=False)
        ax.xaxis.set_major_formatter(_plain)
        ax.minorticks_off()
        if length is not None:
            ax.set_title(f"L = {length}")
        else:
            ax.set_title(f"d_model = {', '.join(str(d) for d in sorted({d for _, d, _ in grid}))}")
        ax.set_xlabel("d_model" if x == "d_model" else "sequence length L")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("MQAR accuracy")
    handles = [Line2D([], [], color=colours[m], marker="o", label=display_name(m)) for m in colours]
    if any(c.missing for c in cells):
        handles.append(Line2D([], [], color="grey", marker="o", markerfacecolor="white", ls="", label="runs pending"))
    if any(line.get_gid().startswith("paper/") for ax in axes for line in ax.lines if line.get_gid()):
        handles.append(Line2D([], [], color="grey", marker="x", ls="--", lw=1, label="paper"))
    axes[-1].legend(handles=handles, fontsize=8)
    figure.tight_layout()
    return figure
