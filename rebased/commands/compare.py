"""`rebased compare RUN RUN ... --out DIR`: language-model runs side by side (rebased/tasks/lm/compare.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rebased.cli import verb


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN", help="run folders of `rebased train`, scored with "
                        "`rebased eval` on the same data sets")  # fmt: skip
    parser.add_argument("--out", required=True, help="folder for summary.md and loss.png")


@verb("compare", "language-model runs side by side: training, perplexity tables, loss curves", _arguments)
def run(args: argparse.Namespace) -> int:
    from rebased.tasks.lm.compare import load_record, write_comparison

    for run_dir in args.run_dirs:  # every folder checked before anything is written
        load_record(run_dir)
    summary, plot = write_comparison(args.run_dirs, Path(args.out))
    print(summary.read_text())
    print(f"written to {summary} and {plot}")
    return 0
