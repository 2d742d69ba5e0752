"""The head-loss tile kernels' launches at an MQAR micro-batch's shape (CUDA): each kernel's time per launch,
each launch's outputs checked against the committed launches', and the launches to paste.

    PYTHONPATH=. python benchmarks/head_loss_bench.py [--cases 65536:8192:64,65536:8192:128]

A case is rows:vocabulary:dim. At the paper's batch an MQAR micro-batch has 65,536 labelled rows, 8,192
classes and d_model 64 or 128, all bf16 as under autocast. The rows kernel (loss, lse and dh) and the columns
kernel (dW over row splits, with their sum) of rebased/ops/triton/head_loss.py are timed apart: the rows
kernel at every launch of ROWS, the columns kernel at every launch of COLS, from the same lse. Time is the
median of triton.testing.do_bench. A launch that does not compile (registers or shared memory) is reported
and skipped.
"""

import argparse
import functools
import itertools

import torch
import triton.testing
from environment import versions

from rebased.ops.triton import head_loss
from rebased.ops.triton.head_loss import TileLaunch, launch_cols, launch_rows
from rebased.testing import error_report

CASES = "65536:8192:64,65536:8192:128"
ROWS = [TileLaunch(m, n, w) for m, n, w in itertools.product((32, 64, 128), (64, 128, 256), (4, 8))]
COLS = [TileLaunch(m, n, w) for m, n, w in itertools.product((32, 64, 128), (32, 64, 128), (4, 8))]
DEVICE = "cuda"
TOLERANCE = {"loss": 1e-5, "dh": 1e-2, "dW": 1e-2}  # bf16 dots in another order: a few bf16 ulps


def inputs(rows: int, vocab: int, dim: int):
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # (the interpreter's bf16 dots are wrong)
    hidden = (torch.randn(rows, dim, device=DEVICE, generator=generator) * 0.5).to(dtype)
    weight = (torch.randn(vocab, dim, device=DEVICE, generator=generator) * dim**-0.5).to(dtype)
    targets = torch.randint(0, vocab, (rows,), device=DEVICE, generator=generator)
    return hidden, weight, targets


def sweep_rows(case, hidden, weight, targets, committed: TileLaunch) -> TileLaunch:
    def run(launch):
        return launch_rows(hidden, weight, targets, -100, True, launch)

    want_loss, _, want_dh = run(committed)
    return sweep(case, "rows", ROWS, committed, run, lambda out: {
        "loss": error_report(out[0].sum(), want_loss.sum())[1], "dh": error_report(out[2], want_dh)[1]})  # fmt: skip


def sweep_cols(case, hidden, weight, targets, committed: TileLaunch, rows_launch: TileLaunch) -> TileLaunch:
    _, lse, _ = launch_rows(hidden, weight, targets, -100, False, rows_launch)

    def run(launch):
        return launch_cols(hidden, weight, targets, -100, lse, launch)

    want = run(committed)
    return sweep(case, "cols", COLS, committed, run, lambda dw: {"dW": error_report(dw, want)[1]})


def sweep(case: str, kernel: str, candidates, committed: TileLaunch, run, errors_of) -> TileLaunch:
    """Run and time `run(launch)` at the committed launch, then every other candidate; print a row each (its
    errors_of(outputs) against the committed launch's); return the fastest launch within TOLERANCE."""
    best = (float("inf"), committed)
    for launch in [committed] + [c for c in candidates if c != committed]:
        try:
            outputs = run(launch)
            ms = triton.testing.do_bench(functools.partial(run, launch), return_mode="median")
        except Exception as error:  # noqa: BLE001 - a launch that cannot run is a row of the table
            print(f"| {case} | {kernel} | {_text(launch)} | failed: {type(error).__name__} | |", flush=True)
            continue
        errors = errors_of(outputs)
        ok = all(errors[name] <= TOLERANCE[name] for name in errors)
        print(f"| {case} | {kernel} | {_text(launch)} | {ms:.3f} | {_errors(errors, ok)} |", flush=True)
        if ok and ms < best[0]:
            best = (ms, launch)
    return best[1]


def _text(launch: TileLaunch) -> str:
    return f"{launch.rows} x {launch.cols}, {launch.warps} warps"


def _errors(errors: dict[str, float], ok: bool) -> str:
    return ", ".join(f"{name} {value:.1e}" for name, value in errors.items()) + ("" if ok else " ABOVE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=CASES, help=f"rows:vocab:dim,... (default {CASES})")
    args = parser.parse_args()
    print(versions(DEVICE))
    print("\nEach kernel's median ms per launch (rows x cols tile, warps), the committed launch first; relative RMS")
    print("against the committed launch's outputs.\n")
    print("| rows x vocab x dim | kernel | launch | ms | relative RMS |")
    print("| --- | --- | --- | --- | --- |")
    chosen = {}
    for item in args.cases.split(","):
        rows, vocab, dim = map(int, item.split(":"))
        case = f"{rows:,} x {vocab:,} x {dim}"
        hidden, weight, targets = inputs(rows, vocab, dim)
        committed = head_loss.launches(dim)
        best_rows = sweep_rows(case, hidden, weight, targets, committed["rows"])
        best_cols = sweep_cols(case, hidden, weight, targets, committed["cols"], committed["rows"])
        chosen[dim] = {"rows": best_rows, "cols": best_cols}
    print("\nfastest launches within tolerance, per head width (GPU_LAUNCHES for D <= 64, GPU_LAUNCHES_WIDE above):")
    for dim, launch in chosen.items():
        print(f"  D {dim}: {launch}")


if __name__ == "__main__":
    main()
