"""`rebased bench`: check every op mode against the float64 reference, then time them across lengths."""

from __future__ import annotations

import argparse
import sys

from rebased.cli import verb


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--feature-map", default="rebased", help="polynomial feature map (rebased, taylor, square...)")
    parser.add_argument("--lengths", default="256,1024,4096", help="comma-separated sequence lengths to time")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--value-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", default="torch", help="comma-separated: torch, triton")
    parser.add_argument("--repeats", type=int, default=3)


@verb("bench", "check the linear-attention ops against the reference and time every mode", _arguments)
def run(args: argparse.Namespace) -> int:
    import torch

    from rebased.benchmark import OpBenchConfig, check_modes, time_modes
    from rebased.tables import markdown_table

    config = OpBenchConfig(
        feature_map=args.feature_map,
        batch=args.batch,
        heads=args.heads,
        head_dim=args.head_dim,
        value_dim=args.value_dim,
        lengths=tuple(int(t) for t in args.lengths.split(",")),
        backends=tuple(args.backends.split(",")),
        dtype=args.dtype,
        device=args.device,
        repeats=args.repeats,
    )
    torch.set_flush_denormal(True)
    print(
        f"rebased bench: {config.feature_map} kernel, B={config.batch} H={config.heads} D={config.head_dim} "
        f"V={config.value_dim} {config.dtype} on {config.device} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)"
    )
    print(f"\nCorrectness at T={config.check_length} with an initial state, relative RMS error against float64:")
    checks = check_modes(config)
    print(
        markdown_table(
            ["mode", "backend", "output", "final state", "worst grad"],
            [[r.mode, r.backend, r.output_err, r.state_err, r.grad_err] for r in checks],
        )
    )
    print(f"\nTime, median of {config.repeats} (ms; '-' = not run: the recurrent scan is a Python loop):")
    show = sys.stdout.isatty()
    rows = time_modes(
        config, progress=lambda what: show and print(f"  timing {what} ...".ljust(40), end="\r", flush=True)
    )
    table = [[r.length, r.mode, r.backend, r.forward_ms, r.backward_ms] for r in rows]
    print(markdown_table(["T", "mode", "backend", "forward", "forward+backward"], table))
    worst = max(max(r.output_err, r.grad_err) for r in checks)
    tolerance = 1e-4 if config.dtype == "float32" else 2e-2
    print(f"\nworst relative error {worst:.2e} ({'within' if worst <= tolerance else 'ABOVE'} {tolerance:g})")
    return 0 if worst <= tolerance else 1
