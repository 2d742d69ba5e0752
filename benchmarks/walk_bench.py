"""What the launch sweeps of the kernels that walk a sequence share (scan_bench.py, wkv_bench.py): each launch of
a kernel module's GPU_* settings timed beside the op's torch form and checked against that form in float64, one
table a case, then the fastest accurate launch per case.

An op here is op(*leaves, backend=...) -> (y, final state); a case's leaves and the gradient of y come from the
bench's inputs(*case).
"""

import torch
import triton.testing
from environment import versions

from rebased.tables import markdown_table
from rebased.testing import error_report

COLUMNS = ["launch", "forward ms", "forward + backward ms", "y rel. RMS", "grads rel. RMS"]


def parse_cases(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(part) for part in item.split(":")) for item in text.split(",")]


def timings(run, leaves, dy) -> tuple[float, float]:
    """ms of the forward alone, and of forward + backward (the median of triton.testing.do_bench)."""
    forward = triton.testing.do_bench(lambda: run(*leaves))
    both = triton.testing.do_bench(lambda: torch.autograd.grad(run(*leaves)[0], leaves, dy))
    return forward, both


def errors(run, reference, leaves, dy) -> tuple[float, float]:
    """Relative RMS of y and the worst of the gradients against reference in float64, on the first 2 sequences."""
    small = [(t.detach()[:2] if t.dim() == 3 else t.detach()).requires_grad_() for t in leaves]
    y, _ = run(*small)
    grads = torch.autograd.grad(y, small, dy[:2])
    exact = [t.detach().double().requires_grad_() for t in small]
    want_y, _ = reference(*exact)
    want = torch.autograd.grad(want_y, exact, dy[:2].double())
    return error_report(y, want_y)[1], max(error_report(g, w)[1] for g, w in zip(grads, want))


def sweep(cases, inputs, op, kernels, settings, launches, describe, heading, tolerance) -> None:
    """Print a table a case and the fastest accurate launches. settings: the names of kernels' GPU_* globals that
    a launch (a tuple of their values) sets; the committed values go first and are put back after each case.
    describe(launch) and heading(case) give the table's labels."""
    print(versions(), flush=True)
    committed = tuple(getattr(kernels, name) for name in settings)
    launches = [committed] + [launch for launch in launches if launch != committed]
    torch_run = lambda *leaves: op(*leaves, backend="torch")  # noqa: E731
    best = {}
    for case in cases:
        leaves, dy = inputs(*case)
        rows = []
        try:
            forward, both = timings(torch_run, leaves, dy)
            rows.append(["torch chunked form", f"{forward:.3f}", f"{both:.3f}", "", ""])
        except torch.OutOfMemoryError:
            rows.append(["torch chunked form", "out of memory", "", "", ""])
        torch.cuda.empty_cache()
        for launch in launches:

            def run(*leaves, launch=launch):
                for name, value in zip(settings, launch):
                    setattr(kernels, name, value)
                return op(*leaves, backend="triton")

            y_error, grad_error = errors(run, torch_run, leaves, dy)
            forward, both = timings(run, leaves, dy)
            label = describe(launch) + (" (committed)" if launch == committed else "")
            rows.append([label, f"{forward:.3f}", f"{both:.3f}", f"{y_error:.1e}", f"{grad_error:.1e}"])
            if max(y_error, grad_error) <= tolerance and both < best.get(case, (float("inf"),))[0]:
                best[case] = (both, launch)
        for name, value in zip(settings, committed):
            setattr(kernels, name, value)
        print(f"\n### {heading(case)}\n", flush=True)
        print(markdown_table(COLUMNS, rows))
    print("\nFastest accurate launch per case (forward + backward):")
    for case, (ms, launch) in best.items():
        print(
            f"  {case}: " + ", ".join(f"{name} = {value}" for name, value in zip(settings, launch)) + f" ({ms:.3f} ms)"
        )
