"""`rebased mqar [EXPERIMENT]`: train and evaluate an MQAR grid, print the table, save results and a plot."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from rebased.cli import verb


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", nargs="?", default="quick", help="quick (default), paper-fig1, "
                        "paper-ablation, length-gen")  # fmt: skip
    parser.add_argument("--out", default=None, help="output folder (default: runs/mqar-<experiment>)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per cell (default: the experiment's)")
    parser.add_argument("--models", default=None, help="comma-separated subset of the experiment's models")
    parser.add_argument("--lengths", default=None, help="comma-separated subset of the experiment's seq_len values")
    parser.add_argument("--d-models", default=None, help="comma-separated subset of the experiment's d_model values")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a run field for every run, e.g. --set epochs=2 (repeatable)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="runs trained at once, in separate processes")
    parser.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                        help="then start no new run and checkpoint the running ones; run again to resume")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: rewrite the table, summary.md, plot from --out's results")  # fmt: skip


def parse_overrides(pairs: list[str]) -> dict:
    from rebased.tasks.mqar.grids import MQARRun

    types = {f.name: f.type for f in dataclasses.fields(MQARRun)}
    overrides = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in types or not value:
            raise ValueError(f"--set {pair!r}: expected FIELD=VALUE with FIELD one of {', '.join(types)}")
        overrides[name] = float(value) if types[name] == "float" else int(value) if types[name] == "int" else value
    return overrides


def keep_runs(runs: list, field: str, wanted: str | None, kind: type, flag: str, experiment: str) -> list:
    """The runs whose `field` is one of the comma-separated `wanted` values (all runs when wanted is None)."""
    if wanted is None:
        return runs
    values = {kind(value) for value in wanted.split(",")}
    kept = [r for r in runs if getattr(r, field) in values]
    if not kept:
        raise ValueError(f"{flag} {wanted!r}: none of them is in experiment {experiment!r}")
    return kept


@verb("mqar", "train and evaluate an MQAR grid; print the table, write results.jsonl, summary.md, a plot", _arguments)
def run(args: argparse.Namespace) -> int:
    from rebased.tasks.mqar.grids import experiment
    from rebased.tasks.mqar.paper_values import PAPER_VALUES
    from rebased.tasks.mqar.sweep import (
        paper_comparison,
        pending_runs,
        plot_summary,
        run_sweep,
        stored_results,
        summarise,
        summary_markdown,
    )

    runs = experiment(args.experiment, args.seeds, **parse_overrides(args.set))
    for flag, field, kind in (("models", "model", str), ("lengths", "seq_len", int), ("d_models", "d_model", int)):
        runs = keep_runs(runs, field, getattr(args, flag), kind, f"--{flag.replace('_', '-')}", args.experiment)
    out = Path(args.out or f"runs/mqar-{args.experiment}")
    print(f"rebased mqar {args.experiment}: {len(runs)} runs -> {out}")
    if args.dry_run:
        pending = pending_runs(runs, stored_results(runs, out / "results.jsonl"))
        print(f"{len(runs) - len(pending)} done in {out / 'results.jsonl'}; {len(pending)} to train, in this order:")
        for r in pending:
            print(f"  {r.run_id}")
        return 0
    started = time.perf_counter()

    def report(result: dict, done: int, total: int) -> None:
        print(f"  [{done}/{total}] {result['run_id']}: accuracy {result['accuracy']:.3f} "
              f"({result['seconds']:.0f} s, {result['steps']} steps)", flush=True)  # fmt: skip

    limit = None if args.time_limit is None else 60 * args.time_limit
    if args.report:
        results = stored_results(runs, out / "results.jsonl")
    else:
        results = run_sweep(
            runs, out, workers=args.workers, progress=sys.stderr.isatty(), time_limit=limit, on_result=report
        )
    if not results:
        print("no run finished (time limit?); run the same command again to continue")
        return 1
    cells = summarise(results, runs)
    table = summary_markdown(cells)
    minutes = (time.perf_counter() - started) / 60
    words = sys.argv[2:] if sys.argv[1:2] == ["mqar"] else [args.experiment]
    command = " ".join(["rebased", "mqar", *words])
    left = len(runs) - len(results)
    again = "the same command without --report" if args.report else "the same command again"
    state = f"{left} of {len(runs)} runs still to train: run {again}" if left else "complete"
    comparison = paper_comparison(cells, PAPER_VALUES.get(args.experiment, {}))
    beside = f"\nBeside the paper (PAPER.md):\n\n{comparison}\n" if comparison else ""
    (out / "summary.md").write_text(
        f"# MQAR: {args.experiment}\n\nCommand: `{command}` ({state})\n\nBest test accuracy per run, mean ± std "
        f"over seeds at the best learning rate per cell.\n\n{table}\n{beside}"
    )
    plot = plot_summary(cells, out / "accuracy.png")
    print(f"\n{table}\n\n{len(results)} runs ({state}) in {minutes:.1f} min; wrote {out / 'results.jsonl'}, "
          f"{out / 'summary.md'}" + (f", {plot}" if plot else ""))  # fmt: skip
    return 0
