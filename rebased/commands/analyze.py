"""`rebased analyze RUN_DIR`: where a trained MQAR model looks. Per layer with a score matrix: IoU of the
binarised query rows with the positions MQAR asks for, score mass on them, row entropy, and the model's
accuracy (docs/paper.md section 5, Table 5); analysis.json and figures in --out."""

from __future__ import annotations

import argparse
from pathlib import Path

from rebased.cli import positive_int, verb


def _rule(text: str):
    from rebased.analysis.similarity import parse_rule

    try:
        return parse_rule(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _layer(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a layer index (an integer >= 0), got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="an MQAR run folder (model.safetensors + config.json with 'mqar_run')")
    parser.add_argument("--examples", type=positive_int, default=1000, help="test examples (default 1000)")
    parser.add_argument("--layer", type=_layer, default=None,
                        help="the layer to analyse (default: every softmax / linear attention layer)")  # fmt: skip
    parser.add_argument("--rule", type=_rule, default="top1", help="how score rows become binary for the IoU: "
                        "top1 (default), topk:K, threshold:X")  # fmt: skip
    parser.add_argument("--target", choices=("value", "key", "pair"), default="value",
                        help="the position a query must read: its pair's value (default), key, or both")  # fmt: skip
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR/analysis)")


@verb("analyze", "score matrices of a trained MQAR model against the positions it must read", _arguments)
def run(args: argparse.Namespace) -> int:
    from rebased.analysis.report import analyze_run
    from rebased.tables import markdown_table

    rule = str(args.rule)  # checked while parsing (argparse also runs the default through _rule)
    out = Path(args.out) if args.out else Path(args.run_dir) / "analysis"
    result = analyze_run(args.run_dir, examples=args.examples, layer=args.layer, rule=rule, target=args.target,
                         out=out)  # fmt: skip
    print(f"{result['run']}: {result['examples']} examples, L {result['seq_len']}, rule {result['rule']}, "
          f"target {result['target']} token, scores averaged over heads")  # fmt: skip
    header = ["layer", "mixer", "IoU", "mass on right", "mass elsewhere", "entropy (nats)", "min kv score",
              "kernel floor", "accuracy"]  # fmt: skip
    rows = [[r["layer"], r["mixer"], r["iou"], r["mass_right"], r["mass_irrelevant"], r["entropy"],
             r["min_kv_score"], _floor(r["kernel_floor"]), result["accuracy"]] for r in result["layers"]]  # fmt: skip
    print(markdown_table(header, rows))
    print(f"\nwritten to {out} (analysis.json, {', '.join(result['figures'])})")
    return 0


def _floor(floor: dict) -> str:
    if floor["min_similarity"] is None:
        return floor["note"] or "n/a"
    return f"{'>' if not floor['attained'] else ''}{floor['min_similarity']:g}"
