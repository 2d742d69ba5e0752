"""RWKV-4's WKV on a CUDA GPU: the Triton kernels' launches (channels a program, tokens a tile, the next tile
prefetched or not) against the torch chunked form, forward + backward, at an MQAR micro-batch's shapes.

    PYTHONPATH=. python benchmarks/wkv_bench.py [--cases 128:2048:64,128:512:64]

A case is sequences:tokens:channels (the RWKV MQAR model at d_model 64 trains micro-batches of 262,144 tokens:
128 sequences of L 2048, or 512 of L 512, its projections in bf16 under autocast and the WKV in fp32, as the
mixer casts them). Each launch is timed forward alone and forward + backward (the median of
triton.testing.do_bench), and checked against the float64 torch form on the case's first 2 sequences (relative
RMS of y and of dk, the worst of the gradients). The tables list the committed launch first and the script ends
with the fastest accurate launch per case: GPU_CHANNELS, GPU_TOKENS and GPU_PREFETCH to commit (tiles of 32
tokens are left out: compiled for sm_90a they spill, where 8 and 16 fit in registers with or without the
prefetch).
"""

import argparse
import itertools

import torch
import triton.testing
from environment import versions

from rebased.ops import rwkv
from rebased.ops.triton import wkv as kernels
from rebased.tables import markdown_table
from rebased.testing import error_report

CASES = "128:2048:64,512:512:64,128:2048:128"
LAUNCHES = list(itertools.product((16, 32), (8, 16), (False, True)))  # (channels, tokens, prefetch)
TORCH_CHUNK = 32  # RWKVConfig's default chunk_size
TOLERANCE = 1e-4  # fp32 math against float64; the backward's sums run over thousands of tokens


def parse_cases(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(part) for part in item.split(":")) for item in text.split(",")]


def inputs(sequences: int, tokens: int, channels: int):
    """w, u, k, v (fp32 leaves, as the mixer passes them) and the gradient of y."""
    g = torch.Generator(device="cuda").manual_seed(0)
    w = -torch.exp(torch.linspace(-5, 3, channels, device="cuda"))
    u = torch.randn(channels, device="cuda", generator=g)
    k, v, dy = (torch.randn(sequences, tokens, channels, device="cuda", generator=g) for _ in range(3))
    return [t.requires_grad_() for t in (w, u, k, v)], dy


def timings(run, leaves, dy) -> tuple[float, float]:
    """ms of the forward alone, and of forward + backward."""
    forward = triton.testing.do_bench(lambda: run(*leaves))
    both = triton.testing.do_bench(lambda: torch.autograd.grad(run(*leaves)[0], leaves, dy))
    return forward, both


def errors(run, leaves, dy) -> tuple[float, float]:
    """Relative RMS of y and the worst of the gradients against the float64 torch form, on 2 sequences."""
    small = [t.detach()[:2] if t.dim() == 3 else t.detach() for t in leaves]
    small = [t.requires_grad_() for t in small]
    y, _ = run(*small)
    grads = torch.autograd.grad(y, small, dy[:2])
    exact = [t.detach().double().requires_grad_() for t in small]
    want_y, _ = rwkv.wkv(*exact, chunk=TORCH_CHUNK, backend="torch")
    want = torch.autograd.grad(want_y, exact, dy[:2].double())
    return error_report(y, want_y)[1], max(error_report(g, w)[1] for g, w in zip(grads, want))


def with_launch(channels: int, tokens: int, prefetch: bool):
    def run(w, u, k, v):
        kernels.GPU_CHANNELS, kernels.GPU_TOKENS, kernels.GPU_PREFETCH = channels, tokens, prefetch
        return rwkv.wkv(w, u, k, v, chunk=TORCH_CHUNK, backend="triton")

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=CASES, help=f"sequences:tokens:channels,... (default {CASES})")
    args = parser.parse_args()
    print(versions(), flush=True)
    committed = (kernels.GPU_CHANNELS, kernels.GPU_TOKENS, kernels.GPU_PREFETCH)
    launches = [committed] + [launch for launch in LAUNCHES if launch != committed]
    best = {}
    for case in parse_cases(args.cases):
        leaves, dy = inputs(*case)
        rows = []
        torch_run = lambda w, u, k, v: rwkv.wkv(w, u, k, v, chunk=TORCH_CHUNK, backend="torch")  # noqa: E731
        try:
            forward, both = timings(torch_run, leaves, dy)
            rows.append(["torch chunked form", f"{forward:.3f}", f"{both:.3f}", "", ""])
        except torch.OutOfMemoryError:
            rows.append(["torch chunked form", "out of memory", "", "", ""])
        torch.cuda.empty_cache()
        for channels, tokens, prefetch in launches:
            run = with_launch(channels, tokens, prefetch)
            y_error, grad_error = errors(run, leaves, dy)
            forward, both = timings(run, leaves, dy)
            label = f"{channels} channels, tiles of {tokens} tokens" + (", prefetched" if prefetch else "")
            label += " (committed)" if (channels, tokens, prefetch) == committed else ""
            rows.append([label, f"{forward:.3f}", f"{both:.3f}", f"{y_error:.1e}", f"{grad_error:.1e}"])
            if max(y_error, grad_error) <= TOLERANCE and both < best.get(case, (float("inf"),))[0]:
                best[case] = (both, channels, tokens, prefetch)
        kernels.GPU_CHANNELS, kernels.GPU_TOKENS, kernels.GPU_PREFETCH = committed
        print(f"\n### {case[0]} sequences x {case[1]} tokens x {case[2]} channels\n", flush=True)
        print(markdown_table(["launch", "forward ms", "forward + backward ms", "y rel. RMS", "grads rel. RMS"], rows))
    print("\nFastest accurate launch per case (forward + backward):")
    for case, (ms, channels, tokens, prefetch) in best.items():
        print(f"  {case}: GPU_CHANNELS = {channels}, GPU_TOKENS = {tokens}, GPU_PREFETCH = {prefetch} ({ms:.3f} ms)")


if __name__ == "__main__":
    main()
