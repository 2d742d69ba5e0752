"""`rebased mqar [EXPERIMENT]`: train and evaluate an MQAR grid, print the table, save results and a plot.

Everything the command line asks for is checked before the first run starts. Ctrl-C stops the sweep the
way --time-limit does: finished runs are in results.jsonl, the runs still training checkpoint after their
current step, and the command prints how to resume; a second Ctrl-C quits at once. --shard I/N trains one
of N disjoint parts of the grid, so a launcher's processes share a grid and one output folder.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import os
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from rebased.cli import INTERRUPTED, names, positive_float, positive_floats, positive_int, positive_ints, verb


def shard(text: str):
    """argparse type: --shard I/N or auto (rebased.tasks.mqar.sharding.parse_shard)."""
    from rebased.tasks.mqar.sharding import parse_shard

    try:
        return parse_shard(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", nargs="?", default="quick", help="quick (default), paper-fig1, "
                        "paper-ablation, paper-similarity, length-gen")  # fmt: skip
    parser.add_argument("--out", default=None, help="output folder (default: runs/mqar-<experiment>)")
    parser.add_argument("--seeds", type=positive_int, default=None, help="seeds per cell (default: the experiment's)")
    parser.add_argument("--models", type=names, default=None, help="comma-separated subset of the experiment's "
                        "models, by CLI name: rebased (ReBased), based (Based), attention (ConvAttention), mamba, "
                        "rwkv, or a kernel of paper-ablation")  # fmt: skip
    parser.add_argument("--lengths", type=positive_ints, default=None,
                        help="comma-separated subset of the experiment's seq_len values")  # fmt: skip
    parser.add_argument("--d-models", type=positive_ints, default=None,
                        help="comma-separated subset of the experiment's d_model values")  # fmt: skip
    parser.add_argument("--lrs", type=positive_floats, default=None,
                        help="comma-separated subset of the experiment's learning rates")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a run field for every run, e.g. --set epochs=2 (repeatable)")  # fmt: skip
    parser.add_argument("--workers", type=positive_int, default=1,
                        help="runs trained at once, in separate processes")  # fmt: skip
    parser.add_argument("--time-limit", type=positive_float, default=None, metavar="MINUTES",
                        help="then start no new run and checkpoint the running ones; run again to resume")  # fmt: skip
    parser.add_argument("--shard", type=shard, default=None, metavar="I/N",
                        help="train shard I of N (I from 0) of the grid, into the --out the other shards share: "
                        "e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; auto: RANK/WORLD_SIZE under "
                        "torchrun, one GPU each (LOCAL_RANK)")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="list the runs left and their times, and exit")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: rewrite the table, summary.md, plot from --out's results")  # fmt: skip


_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a name", "bool": "true or false"}
_MIX_TYPE = "tuple[tuple[int, int], ...]"


def parse_overrides(pairs: list[str]) -> dict:
    """--set FIELD=VALUE pairs -> {field: value of the MQARRun field's type}; ValueError naming the field
    and the type it takes. train_mix and test_mix take L:N pairs, e.g. 64:8,128:16."""
    from rebased.tasks.mqar.grids import MQARRun

    types = {f.name: f.type for f in dataclasses.fields(MQARRun)}
    overrides = {}
    for pair in pairs:
        name, equals, text = pair.partition("=")
        if name not in types:
            close = difflib.get_close_matches(name, types, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"--set {pair!r}: unknown field {name!r}{hint} (fields: {', '.join(types)})")
        if not equals or not text:
            raise ValueError(f"--set {pair!r}: expected {name}=VALUE")
        overrides[name] = _parse_value(pair, name, types[name], text)
    return overrides


def _parse_value(pair: str, name: str, kind: str, text: str):
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "bool":
            return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[text.lower()]
        if kind == _MIX_TYPE:
            mix = tuple(tuple(int(x) for x in segment.split(":")) for segment in text.split(","))
            if any(len(segment) != 2 for segment in mix):
                raise ValueError(text)
            return mix
    except (ValueError, KeyError):
        what = "L:N pairs, e.g. 64:8,128:16" if kind == _MIX_TYPE else _TYPE_WORDS[kind]
        raise ValueError(f"--set {pair!r}: {name} takes {what}, got {text!r}") from None
    return text


def keep_runs(runs: list, field: str, wanted: tuple | None, flag: str, experiment: str) -> list:
    """The runs whose `field` is one of `wanted` (all runs when wanted is None); ValueError naming any wanted
    value the experiment does not have, with the values it has."""
    from rebased.tasks.mqar.grids import DISPLAY_NAMES, display_name

    if wanted is None:
        return runs
    have = list(dict.fromkeys(getattr(r, field) for r in runs))
    unknown = [value for value in wanted if value not in have]
    if unknown:
        listed = ", ".join(f"{v} ({display_name(v)})" if field == "model" else str(v) for v in have)
        message = f"{flag} {','.join(map(str, wanted))}: {', '.join(map(str, unknown))} not in experiment "
        message += f"{experiment!r}, which has {listed}"
        keys = {display.lower(): key for key, display in DISPLAY_NAMES.items()}
        named = [f"{v!r} is {keys[str(v).lower()]!r}" for v in unknown if str(v).lower() in keys]
        if field == "model" and named:
            message += f" ({'; '.join(named)} on the command line)"
        raise ValueError(message)
    return [r for r in runs if getattr(r, field) in wanted]


def command_line(args: argparse.Namespace, out: Path | None = None, *, shard: bool = True) -> str:
    """The command that trains these runs (never --dry-run or --report), with --out when given or `out`;
    without --shard when shard is False (the whole grid's command)."""
    words = ["rebased", "mqar", args.experiment]
    if args.out or out:
        words += ["--out", str(args.out or out)]
    if args.seeds is not None:
        words += ["--seeds", str(args.seeds)]
    filters = (("--models", args.models), ("--lengths", args.lengths), ("--d-models", args.d_models),
               ("--lrs", args.lrs))  # fmt: skip
    for flag, values in filters:
        if values:
            words += [flag, ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)]
    for pair in args.set:
        words += ["--set", pair]
    if args.workers != 1:
        words += ["--workers", str(args.workers)]
    if args.time_limit is not None:
        words += ["--time-limit", f"{args.time_limit:g}"]
    if shard and args.shard is not None:
        words += ["--shard", args.shard.argument]
    return shlex.join(words)


@verb("mqar", "train and evaluate an MQAR grid; print the table, write results.jsonl, summary.md, a plot", _arguments)
def run(args: argparse.Namespace) -> int:
    from rebased.tasks.mqar.grids import experiment
    from rebased.tasks.mqar.sweep import check_runs

    runs = experiment(args.experiment, args.seeds, **parse_overrides(args.set))
    for flag, field in (("models", "model"), ("lengths", "seq_len"), ("d_models", "d_model"), ("lrs", "lr")):
        runs = keep_runs(runs, field, getattr(args, flag), f"--{flag.replace('_', '-')}", args.experiment)
    check_runs(runs)
    out = Path(args.out or f"runs/mqar-{args.experiment}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file, not a folder")
    return _report(args, runs, out) if args.report else _train(args, runs, out)


def _report(args: argparse.Namespace, runs, out: Path) -> int:
    """--report: the table, summary.md and plot from the results so far, under results.jsonl's lock."""
    from rebased.tasks.mqar.sweep import RESULTS_FILE, results_locked, stored_results

    results_path = out / RESULTS_FILE
    if not results_path.exists():
        raise ValueError(f"--report: no results.jsonl in {out}: nothing was trained there; train with "
                         f"`{command_line(args, shard=False)}`")  # fmt: skip
    with results_locked(results_path):
        results = stored_results(runs, results_path)
        if not results:
            raise ValueError(f"--report: {results_path} holds none of these {len(runs)} runs (were they trained "
                             "with other --set, --seeds or --models?)")  # fmt: skip
        wrote = _write_outputs(args, runs, results, out)
    print(f"\n{len(results)} of {len(runs)} runs done; wrote {wrote}")
    return 0


def _train(args: argparse.Namespace, runs, out: Path) -> int:
    """Train this process's runs (its shard's, or all), then summarise every shard's results so far."""
    from tqdm.auto import tqdm

    from rebased.tasks.mqar.sharding import shard_runs
    from rebased.tasks.mqar.sweep import (
        RESULTS_FILE,
        StopRequest,
        finished_results,
        pending_runs,
        run_sweep,
        stop_on_interrupt,
        stopped_runs,
    )

    results_path = out / RESULTS_FILE
    mine = runs if args.shard is None else shard_runs(runs, args.shard)
    done = _of(mine, finished_results(runs, results_path))  # every line checked against the grid, not only mine
    pending = pending_runs(mine, done)
    resumed = len(stopped_runs(mine, done, out))
    from_checkpoints = f", {resumed} of them from their checkpoints" if resumed else ""
    part = "" if args.shard is None else f", shard {args.shard}: {len(mine)} of them"
    print(f"rebased mqar {args.experiment}: {len(runs)} runs{part} -> {out} ({len(done)} done, {len(pending)} to "
          f"train{from_checkpoints})")  # fmt: skip
    if args.dry_run:
        from rebased.tasks.mqar.report import estimate_lines

        lines, totals = estimate_lines(pending, done)
        print(f"to train, in this order ({results_path} holds the finished ones), each with its time if it trains "
              "all its steps, from the latest finished runs of its model and d_model:")  # fmt: skip
        print("\n".join(lines))
        if totals:
            print(f"in all: {totals} (runs that reach the early stop take less)")
        return 0
    started = time.perf_counter()

    def report(result: dict, done: int, total: int) -> None:
        # tqdm.write puts the line above the progress bar, if one is shown. The newline goes in the same write:
        # shards launched together share one stdout, and a write between a line and its newline would join lines.
        tqdm.write(f"  [{done}/{total}] {result['run_id']}: accuracy {result['accuracy']:.3f} "
                   f"({result['seconds']:.0f} s, {result['steps']} steps)\n", file=sys.stdout, end="")  # fmt: skip

    def first_interrupt() -> None:
        print("\nCtrl-C: stopping; each run still training checkpoints after its current step "
              "(Ctrl-C again to quit at once)", file=sys.stderr, flush=True)  # fmt: skip

    stop = StopRequest()
    limit = None if args.time_limit is None else 60 * args.time_limit
    try:
        with stop_on_interrupt(stop, first_interrupt), _as_shard(args.shard) as device:
            results = run_sweep(mine, out, workers=args.workers, progress=sys.stderr.isatty(), time_limit=limit,
                                stop=stop, device=device, on_result=report)  # fmt: skip
    except KeyboardInterrupt:
        results = _of(mine, finished_results(runs, results_path))
        print(f"\nrebased mqar: quit at once (second Ctrl-C). {_where_things_are(mine, results, out, args)}",
              file=sys.stderr)  # fmt: skip
        return INTERRUPTED
    minutes = (time.perf_counter() - started) / 60
    grid_results, wrote = _write_grid_outputs(args, runs, out)
    if grid_results:
        print(f"\n{len(grid_results)} of {len(runs)} runs done ({minutes:.1f} min this call); wrote {wrote}")
    if stop.is_set():
        print(f"\nrebased mqar: stopped by Ctrl-C. {_where_things_are(mine, results, out, args)}", file=sys.stderr)
        return INTERRUPTED
    if len(results) < len(mine):  # the time limit
        print(f"\nTime limit reached. {_where_things_are(mine, results, out, args)}")
    return 0


def _of(runs, results: list[dict]) -> list[dict]:
    """The results of `runs`."""
    ids = {run.run_id for run in runs}
    return [result for result in results if result["run_id"] in ids]


@contextlib.contextmanager
def _as_shard(shard) -> Iterator[str]:
    """Within: the device to train on. A shard takes the GPU its launcher gives it (shard_device) and trains
    each run alone, out of any DDP group the launcher's environment describes (training_alone); without
    --shard, the device is "auto" and the environment is left as it is."""
    if shard is None:
        yield "auto"
        return
    import torch

    from rebased.tasks.mqar.sharding import shard_device, training_alone

    with training_alone():
        yield shard_device(os.environ, torch.cuda.device_count())


def _where_things_are(runs, results, out: Path, args: argparse.Namespace) -> str:
    """Where the finished and the stopped runs (of this shard, with --shard) are, and the command that
    continues them."""
    from rebased.tasks.mqar.sweep import stopped_runs

    stopped = stopped_runs(runs, results, out)
    left = len(runs) - len(results) - len(stopped)
    scope = "" if args.shard is None else f" of shard {args.shard}"
    lines = [f"finished runs{scope}, in {out / 'results.jsonl'}: {len(results)} of {len(runs)}"]
    if stopped:
        ids = ", ".join(run.run_id for run in stopped)
        lines.append(f"checkpointed, to continue from {out / 'runs'}/RUN_ID/checkpoint.pt: {ids}")
    if left:
        lines.append(f"not started: {left}")
    if len(results) < len(runs):
        lines.append(f"resume with: {command_line(args, out)}")
    return "\n".join(lines)


def _write_grid_outputs(args: argparse.Namespace, runs, out: Path) -> tuple[list[dict], str]:
    """Every shard's results so far and what _write_outputs wrote from them ([] and "" when there are none).
    Under results.jsonl's lock, so shards finishing together take turns, and the last to take it, after
    its own last line, summarises every line there."""
    from rebased.tasks.mqar.sweep import RESULTS_FILE, results_locked, stored_results

    results_path = out / RESULTS_FILE
    if not results_path.exists():
        return [], ""
    with results_locked(results_path):
        results = stored_results(runs, results_path)
        return results, (_write_outputs(args, runs, results, out) if results else "")


def _write_outputs(args: argparse.Namespace, runs, results, out: Path) -> str:
    """Print the table; write summary.md and the plot. Returns what was written."""
    from rebased.files import atomic_write
    from rebased.tasks.mqar.grids import display_name
    from rebased.tasks.mqar.paper_values import PAPER_VALUES
    from rebased.tasks.mqar.report import (
        paper_comparison,
        pending_cells,
        plot_summary,
        summarise,
        summary_caption,
        summary_markdown,
        training_time,
    )

    cells = summarise(results, runs)
    table = summary_markdown(cells)
    left = len(runs) - len(results)
    command = command_line(args, shard=False)  # the whole grid's, whichever shard writes it
    state = f"{left} of {len(runs)} runs still to train: run it again" if left else "complete"
    models = ", ".join(f"{display_name(m)} = `{m}`" for m in dict.fromkeys(c.model for c in cells))
    comparison = paper_comparison(cells, PAPER_VALUES.get(args.experiment, {}))
    beside = (
        f"\nBeside the paper (Aksenov et al., ACL 2024, arXiv 2402.10644; its settings and values are in "
        f"docs/paper.md of the rebased repository):\n\n{comparison}\n"
        if comparison
        else ""
    )
    pending = pending_cells(runs, results, PAPER_VALUES.get(args.experiment, {}))
    still = f"\nStill to train, in the order the sweep takes them:\n\n{pending}\n" if pending else ""
    timing = training_time(results)
    spent = (
        f"\nTraining time (each run's own wall time in training, evaluations included; runs trained side by side "
        f"overlap):\n\n{timing}"
        if timing
        else ""
    )
    summary = (
        f"# MQAR: {args.experiment}\n\nCommand: `{command}` ({state})\n\n{summary_caption(cells)} Models "
        f"(command-line names): {models}.\n\n{table}\n{beside}{still}{spent}"
    )
    atomic_write(out / "summary.md", lambda handle: handle.write(summary.encode()))
    print(f"\n{table}")
    plot = plot_summary(cells, out / "accuracy.png", results, out / "runs", PAPER_VALUES.get(args.experiment), runs)
    return ", ".join(str(p) for p in (out / "results.jsonl", out / "summary.md", plot) if p)
