"""`rebased eval RUN --data DIR [--data DIR2 ...]`: perplexity of a trained language model, overall and on
associative-recall / other tokens, by position; printed and stored in RUN/eval.json."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rebased.cli import device, positive_int, verb

EVAL_FILE = "eval.json"


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder of `rebased train`")
    parser.add_argument("--data", action="append", required=True, metavar="DIR",
                        help="a shards folder made with the run's tokenizer (repeatable: in-domain, "
                        "out-of-domain, ...)")  # fmt: skip
    parser.add_argument("--split", default="val", help="the shards' split to score (default val)")
    parser.add_argument("--seq-len", type=positive_int, default=None, help="window length (default: the run's)")
    parser.add_argument("--max-tokens", type=positive_int, default=None, help="score only the first N tokens")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass")
    parser.add_argument("--device", type=device, default=None, help="cpu, cuda (default: cuda if there is one)")


@verb("eval", "perplexity of a trained language model: overall, recall (AR) and other tokens", _arguments)
def run(args: argparse.Namespace) -> int:
    from rebased.tables import markdown_table
    from rebased.tasks.lm.evaluate import check_same_tokenizer, evaluate_run

    run_dir = Path(args.run_dir)
    for data in args.data:  # every folder checked before the first is scored
        check_same_tokenizer(run_dir, Path(data))
    results = [
        evaluate_run(run_dir, data, split=args.split, seq_len=args.seq_len, max_tokens=args.max_tokens,
                     batch_size=args.batch_size, device=args.device or "auto", progress=sys.stderr.isatty())
        for data in args.data
    ]  # fmt: skip
    rows = [[r["data"], r["split"], r["ppl/all"], r["ppl/ar"], r["ppl/other"], r["tokens/all"], r["tokens/ar"]]
            for r in results]  # fmt: skip
    print(markdown_table(["data", "split", "ppl", "AR ppl", "other ppl", "tokens", "AR tokens"], rows))
    buckets = sorted({k.removeprefix("ppl/") for r in results for k in r if k.startswith("ppl/pos")},
                     key=lambda name: int(name[3:].split("-")[0]))  # fmt: skip
    print("\nby position of the predicted token in its window:")
    print(markdown_table(["data", *buckets], [[r["data"], *(r.get(f"ppl/{b}", float("nan")) for b in buckets)]
                                              for r in results]))  # fmt: skip
    path = store(run_dir, results)
    print(f"\nwritten to {path}")
    return 0


def store(run_dir: Path, results: list[dict]) -> Path:
    """RUN/eval.json: one entry per (data, split, seq_len), a new score replacing the old."""
    from rebased.files import atomic_write

    path = run_dir / EVAL_FILE
    stored = json.loads(path.read_text()) if path.exists() else []
    key = lambda r: (r["data"], r["split"], r["seq_len"])  # noqa: E731
    merged = {key(r): r for r in [*stored, *results]}
    text = json.dumps(list(merged.values()), indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
    return path
