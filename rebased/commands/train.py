"""`rebased train DATA --out RUN`: train a language model on token shards; `rebased train RUN`: resume it.

Under `torchrun --nproc_per_node N -m rebased train ...` every process takes its share of each batch.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import sys
from pathlib import Path

from rebased.cli import INTERRUPTED, positive_float, positive_int, verb


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a shards folder (`rebased data prepare`) to start a run, or a run folder "
                        "(holding run.json) to resume it")  # fmt: skip
    parser.add_argument("--out", default=None, help="the run folder (new runs)")
    parser.add_argument("--preset", default=None, help="model preset (default pile_150m): pile_150m, based_360m, "
                        "tiny, tiny_hybrid")  # fmt: skip
    parser.add_argument("--model", action="append", default=[], metavar="FIELD=VALUE", help="a preset option or "
                        "model field, e.g. --model kind=based --model n_layers=6 (repeatable)")  # fmt: skip
    parser.add_argument("--seq-len", type=positive_int, default=None, help="tokens per training sequence")
    parser.add_argument("--batch-tokens", type=positive_int, default=None, help="tokens per optimizer step")
    parser.add_argument("--steps", type=positive_int, default=None, help="optimizer steps")
    parser.add_argument("--lr", type=positive_float, default=None, help="peak learning rate")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="any other run setting, e.g. --set warmup_steps=100 --set compile=true")  # fmt: skip


def parse_value(text: str) -> object:
    """A Python literal (3, 1e-3, true, 'x', [1, 2]) or, failing that, the text itself."""
    lowered = {"true": "True", "false": "False", "none": "None"}.get(text.lower(), text)
    try:
        return ast.literal_eval(lowered)
    except (ValueError, SyntaxError):
        return text


def parse_pairs(pairs: list[str], option: str) -> dict:
    values = {}
    for pair in pairs:
        name, equals, text = pair.partition("=")
        if not equals or not name or not text:
            raise ValueError(f"{option} {pair!r}: expected FIELD=VALUE")
        values[name] = parse_value(text)
    return values


def run_settings(args: argparse.Namespace) -> dict:
    """The LMRun fields the command line sets, checked by name and by the type of their default."""
    from rebased.tasks.lm.train import LMRun

    fields = {f.name: f for f in dataclasses.fields(LMRun)}
    settings = parse_pairs(args.set, "--set")
    flags = {"preset": args.preset, "seq_len": args.seq_len, "batch_tokens": args.batch_tokens,
             "steps": args.steps, "lr": args.lr}  # fmt: skip
    settings.update({name: value for name, value in flags.items() if value is not None})
    if args.model:
        settings["model"] = parse_pairs(args.model, "--model")
    for name, value in settings.items():
        if name not in fields or name == "data":
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"--set {name}: unknown setting{hint} (settings: {', '.join(f for f in fields)})")
        default = LMRun.__dataclass_fields__[name].default
        wanted = type(default) if default is not dataclasses.MISSING else dict
        if wanted is float and isinstance(value, int) and not isinstance(value, bool):
            settings[name] = float(value)
        elif not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
            raise ValueError(f"--set {name}={value!r}: expected {wanted.__name__}")
    return settings


def resolve_run(args: argparse.Namespace):
    """(LMRun, run folder): a new run from a shards folder and --out, or the stored run of a run folder."""
    from rebased.tasks.lm.train import RUN_FILE, LMRun, load_run

    path = Path(args.path)
    settings = run_settings(args)
    if (path / RUN_FILE).is_file():
        if args.out is not None or settings:
            raise ValueError(f"{path} is a run folder: `rebased train {path}` resumes it as it was set up; "
                             "to change settings, start a new run with --out")  # fmt: skip
        return load_run(path), path
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(f"{path}: neither a shards folder (no manifest.json: run `rebased data prepare` "
                                f"first) nor a run folder (no {RUN_FILE})")  # fmt: skip
    if args.out is None:
        raise ValueError("a new run needs --out RUN_DIR")
    return LMRun(data=str(path), **settings), Path(args.out)


@verb("train", "train a language model on token shards (resumes a stopped run)", _arguments)
def run(args: argparse.Namespace) -> int:
    from rebased.tasks.lm.train import train_lm

    lm_run, run_dir = resolve_run(args)
    try:
        result = train_lm(lm_run, run_dir, progress=sys.stderr.isatty())
    except KeyboardInterrupt:
        print(f"\nrebased train: interrupted; the run resumes from its last checkpoint (every "
              f"{lm_run.checkpoint_every} steps) with: rebased train {run_dir}", file=sys.stderr)  # fmt: skip
        return INTERRUPTED
    last = result.history[-1] if result.history else {}
    state = "diverged" if result.diverged else "finished" if result.finished else "stopped"
    print(f"{run_dir}: {state} at step {result.steps} in {result.seconds / 60:.1f} min", end="")
    if "val_all_ppl" in last:
        print(f"; validation perplexity {last['val_all_ppl']:.2f} (AR {last['val_ar_ppl']:.2f}, "
              f"other {last['val_other_ppl']:.2f})", end="")  # fmt: skip
    print(f'\n  rebased eval {run_dir} --data {lm_run.data}\n  rebased generate {run_dir} --prompt "..."')
    return 1 if result.diverged else 0
