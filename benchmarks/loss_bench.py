"""Time and peak memory of a head + cross-entropy, forward and backward: the fused row-chunk op against logits
then F.cross_entropy (what autograd keeps: the [rows, vocab] logits, their fp32 copy and the log-softmax).

Each (case, variant) runs in a fresh process, so the CPU's peak resident memory is that measurement's alone
(on a GPU: torch.cuda.max_memory_allocated). Time: the median of --repeats runs after one warm-up run.

    PYTHONPATH=. python benchmarks/loss_bench.py                                   # CPU, fp32
    PYTHONPATH=. python benchmarks/loss_bench.py --device cuda --bf16 --variants plain,fused-triton,fused-tiles \\
        --cases 262144:8192:64,65536:50304:768
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from rebased.ops import cross_entropy as committed_switches

CASES = "16384:8192:64,65536:8192:64,4096:50304:768"  # rows:vocab:dim (MQAR at L 512: 65,536 rows of 8,192)
# the loss switches as committed, read before use_loss_kernel changes them
COMMITTED = (committed_switches.AUTO_TRITON_ON_GPU, committed_switches.TILED_MAX_DIM)


def use_loss_kernel(kernel: str) -> None:
    """rebased.ops.cross_entropy's switches set so that "auto" on CUDA takes `kernel`: "torch" (chunks of logits,
    softmax in torch ops), "rows" (the Triton row kernel over chunks of logits), "tiles" (the tile kernels) or
    "committed" (the switches as committed: what training runs)."""
    from rebased.ops import cross_entropy

    cross_entropy.AUTO_TRITON_ON_GPU = kernel != "torch" if kernel != "committed" else COMMITTED[0]
    cross_entropy.TILED_MAX_DIM = {"tiles": 256, "committed": COMMITTED[1]}.get(kernel, 0)


def measure(variant: str, rows: int, vocab: int, dim: int, device: str, bf16: bool, repeats: int) -> dict:
    """One variant in this process: seconds per forward+backward and the peak memory above the inputs."""
    from rebased.ops import cross_entropy

    torch.set_flush_denormal(True)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, dim, generator=generator).to(device).requires_grad_(True)
    weight = (torch.randn(vocab, dim, generator=generator) * dim**-0.5).to(device).requires_grad_(True)
    targets = torch.randint(0, vocab, (rows,), generator=generator).to(device)
    use_loss_kernel({"fused-triton": "rows", "fused-tiles": "tiles"}.get(variant, "torch"))

    def step() -> float:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            if variant == "plain":
                loss = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
            else:
                loss = cross_entropy.linear_cross_entropy(hidden, weight, targets)
        loss.backward()
        hidden.grad = weight.grad = None
        return loss.item()

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = step()  # warm-up (and on the CPU the peak: the first run allocates everything)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": statistics.median(times), "peak_bytes": peak - before, "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=CASES, help=f"rows:vocab:dim,... (default {CASES})")
    parser.add_argument(
        "--variants", default="plain,fused", help="plain, fused, fused-triton (row kernel, GPU), fused-tiles (GPU)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="under bf16 autocast, as training on a GPU runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: variant:rows:vocab:dim, in a child process
    args = parser.parse_args()
    if args.one:
        variant, *sizes = args.one.split(":")
        print(json.dumps(measure(variant, *map(int, sizes), args.device, args.bf16, args.repeats)))
        return
    print(f"device {args.device}, {'bf16 autocast' if args.bf16 else 'fp32'}, torch {torch.__version__}\n")
    print("| rows x vocab x dim | variant | ms (fwd+bwd) | peak memory | loss / rows |")
    print("| --- | --- | --- | --- | --- |")
    for case in args.cases.split(","):
        rows, vocab, dim = map(int, case.split(":"))
        for variant in args.variants.split(","):
            child = [sys.executable, __file__, "--one", f"{variant}:{case}", "--device", args.device,
                     "--repeats", str(args.repeats)] + ["--bf16"] * args.bf16  # fmt: skip
            done = subprocess.run(child, capture_output=True, text=True)
            if done.returncode:
                print(f"| {rows} x {vocab} x {dim} | {variant} | failed: {done.stderr.strip().splitlines()[-1]} | | |")
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"| {rows:,} x {vocab:,} x {dim} | {variant} | {result['seconds'] * 1e3:,.0f} | "
                  f"{result['peak_bytes'] / 2**30:.2f} GiB | {result['loss'] / rows:.4f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
