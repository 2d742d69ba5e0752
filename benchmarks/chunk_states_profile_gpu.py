"""Where the chunk-states kernels' time goes: GPU time per kernel (torch.profiler) for one forward+backward of
the op suite's workload (65,536 tokens x 16 heads, q/k 16, v 64, bf16, ReBased), per (chunk length, T); and
the LayerNorm's kernels, torch's against the fused ones, at an MQAR micro-batch's shape (65,536 x 192).

    PYTHONPATH=. python benchmarks/chunk_states_profile_gpu.py [--cases 256:4096,256:65536] [--no-layer-norm]
        [--configs "" "output=64:4:3d dq=128:8"]

--configs profiles other tile sets: one set per argument, each entry NAME=FEATURES:WARPS[:sel|:3d] replacing
that kernel's entry of chunk_states.TILE_CONFIGS for this process (the form as in the code where left out);
"" is the code's set. A set that has not passed the chunk GPU tests (`pytest -m gpu tests/ -k chunk` with it
in the code) can be fast and wrong: Triton 3.6 mis-compiled some 3D-tile sets.
"""

from __future__ import annotations

import argparse

import torch
from environment import versions
from torch.profiler import ProfilerActivity, profile

import rebased.ops.triton.chunk_states as CS
from rebased.ops import Polynomial
from rebased.ops.norm import layer_norm
from rebased.tables import markdown_table

REPEATS = 5
DEFAULT_CONFIGS = dict(CS.TILE_CONFIGS)


def kernel_table(step, title: str) -> None:
    """Runs step() twice to warm up, then REPEATS times under the profiler; prints GPU ms per step by kernel."""
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPEATS):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events) / REPEATS / 1e3
    rows = [[e.key[:60], e.count // REPEATS, f"{e.device_time_total / REPEATS / 1e3:.3f}",
             f"{100 * e.device_time_total / REPEATS / 1e3 / total:.0f}%"] for e in events[:12]]  # fmt: skip
    print(f"\n### {title}: {total:.3f} ms GPU time per step\n", flush=True)
    print(markdown_table(["kernel", "calls", "ms", "share"], rows), flush=True)


def tile_set(text: str) -> dict:
    """DEFAULT_CONFIGS with the entries of "sums=256:8:sel dq=64:4:3d" replaced."""
    configs = dict(DEFAULT_CONFIGS)
    for item in text.split():
        name, _, value = item.partition("=")
        if name not in configs:
            raise ValueError(f"no tiled kernel {name!r}; known: {', '.join(configs)}")
        features, warps, *form = value.split(":")
        if form not in ([], ["sel"], ["3d"]):
            raise ValueError(f"{item!r}: the form is 'sel' or '3d'")
        selectors = configs[name].selectors if not form else form == ["sel"]
        configs[name] = configs[name]._replace(features=int(features), warps=int(warps), selectors=selectors)
    return configs


def chunk_states_case(chunk: int, length: int, configs: str) -> None:
    CS.CHUNK = chunk
    CS.TILE_CONFIGS = tile_set(configs)
    kernel = Polynomial.rebased(16)
    batch = 65536 // length
    q, k = (torch.randn(batch, length, 16, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qk")
    v = torch.randn(batch, length, 16, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    options = dict(initial_state=None, output_final_state=False, normalize=True, eps=1e-12, chunk_size=64)

    def step():
        o = CS.chunk_states_linear_attention(q, k, v, kernel=kernel, **options)[0]
        o.float().sum().backward()

    knobs = "tiles " + " ".join(
        f"{name}={c.features}:{c.warps}:{'sel' if c.selectors else '3d'}" for name, c in CS.TILE_CONFIGS.items()
    )
    kernel_table(step, f"chunk-states C {chunk}, T {length}, fwd+bwd, {knobs}")


def layer_norm_case(backend: str) -> None:
    x = torch.randn(32 * 2048, 192, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(192, device="cuda", requires_grad=True)
    b = torch.zeros(192, device="cuda", requires_grad=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer_norm(x, w, b, 1e-5, backend=backend)
        y.backward(torch.ones_like(y))

    kernel_table(step, f"LayerNorm {backend}, 65536 x 192 bf16 under autocast, fwd+bwd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="256:4096,256:65536,128:65536", help="chunk length:T,... to profile")
    parser.add_argument("--configs", nargs="*", default=[""], help="tile sets, one per argument; '' is the code's")
    parser.add_argument("--no-layer-norm", action="store_true", help="skip the LayerNorm profile")
    args = parser.parse_args()
    print(versions(), flush=True)
    for configs in args.configs:
        for case in args.cases.split(","):
            chunk, length = map(int, case.split(":"))
            chunk_states_case(chunk, length, configs)
    if not args.no_layer_norm:
        for backend in ("torch", "triton"):
            layer_norm_case(backend)


if __name__ == "__main__":
    main()
