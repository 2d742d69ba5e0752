"""The fused chunk kernels (rebased/ops/triton/fused_chunk.py) at the MQAR models' shapes on a CUDA GPU.

    OUT=DIR bash benchmarks/fused_chunk_gpu.sh           # one device call: fla from .whl/ if there, then this
    PYTHONPATH=. python benchmarks/fused_chunk_gpu.py --out DIR [--time-limit 540] [--no-sweep | --sweep-only]
        [--sweep-value-dim 10]
    PYTHONPATH=. python benchmarks/fused_chunk_gpu.py --compile   # no GPU needed: each candidate for sm_90a

In order, so that a time limit cuts the least useful part:
1. accuracy: the code's launches against float64 (bf16 and fp32, ReBased and Based, v 5 and 16, from an
   initial state, gradients of every input): relative RMS error of o, dq, dk, dv and the final state.
2. table: milliseconds (median, triton.testing.do_bench) of the forward and of forward+backward at batch 512,
   12 heads, q/k 16, bf16, the ReBased kernel, v in {5, 16}, L in {256, 512, 1024, 2048}, and one case with
   few (sequence, head) pairs (B 4, L 16384), for: the fused kernels, the same with value dims in power-of-two
   pieces (fused_chunk.SPLIT_VALUES), the chunk-states kernels, the parallel kernel, mode="auto" (what
   linear_attention picks), fla's parallel_rebased and fused_chunk_based (Based's
   kernel; its time only) when fla is importable; each row's ratio to the fused kernels.
3. sweep: each candidates() launch for all three kernels at --sweep-value-dim (default 5, GPU_LAUNCHES; 9-16 are
   GPU_LAUNCHES_WIDE's, 10 being the d_model 128 MQAR models', and beyond GPU_LAUNCHES_WIDER's) for --sweep-kernel
   (default rebased; based times Based's polynomial, its tables ending _LOW_TERMS up to value dim 16): checked against
   float64 at a small shape per kernel (o for the forward, dq, dk and dv; a candidate off by more than 1% is never
   chosen: Triton 3.6 mis-compiled some 3D tiles of the chunk kernels), then each kernel timed alone at B 512, L 2048.
   The fastest accurate candidate per kernel is printed as the table's line to paste into fused_chunk.py.
4. the table's fused rows again with the sweep's choice.
--sweep-only runs stage 3 alone; --no-sweep stops after stage 2; --table-only runs stage 2 alone, over --entries,
--lengths and --value-dims.

Every case runs in try/except (a failure is a row that says so) and nothing starts after --time-limit seconds.
Outputs under --out: fused_chunk.md (every table) and fused_chunk.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rebased.ops import Polynomial, linear_attention, linear_attention_reference
from rebased.ops.kernels import Polynomial as PolynomialType
from rebased.tables import markdown_table
from rebased.testing import error_report

HEADS, HEAD_DIM, BATCH = 12, 16, 512
LENGTHS = (256, 512, 1024, 2048)
VALUE_DIMS = (5, 16)  # the table's
COMPILE_VALUE_DIMS = (1, 2, 4, 5, 16)
FEW_PAIRS = (4, 16384)  # (batch, length): 48 (sequence, head) pairs, where the chunk pair picks chunk-states
EPS = 1e-12


def candidates(value_dim: int = 5):
    """The launches the sweep tries at value_dim, likeliest first (a time limit cuts the tail). Up to 8 values:
    chunk = 16 x warps (every dot's rows filled) with fp32 or 16-bit state operands; one warp with its registers
    capped at 168, 128 and 96 (12, 16 and 20 warps an SM where the compiler's choice of 255 leaves 8: Nsight
    Compute finds these kernels short of ready warps); then one that over-fills (4 warps at 32), one that
    pipelines the loads (2 stages), the flat form. Wider (BV 16): the state is twice as large, every launch spills
    when compiled for sm_90a and one warp spills most, so two and four warps come first and one warp last."""
    from rebased.ops.triton.fused_chunk import Dims, FusedLaunch

    if Dims.of(HEAD_DIM, value_dim).bv > 8:
        return [
            FusedLaunch(32, 2), FusedLaunch(32, 2, low=True), FusedLaunch(32, 4), FusedLaunch(32, 4, low=True),
            FusedLaunch(64, 4), FusedLaunch(64, 4, low=True), FusedLaunch(32, 2, low=True, max_registers=168),
            FusedLaunch(16, 1, low=True), FusedLaunch(16, 1), FusedLaunch(16, 1, stages=2),
        ]  # fmt: skip
    return [
        FusedLaunch(16, 1), FusedLaunch(16, 1, low=True),
        FusedLaunch(16, 1, low=True, max_registers=168), FusedLaunch(16, 1, low=True, max_registers=128),
        FusedLaunch(16, 1, low=True, max_registers=96),
        FusedLaunch(16, 1, stages=2, max_registers=168),
        FusedLaunch(32, 2), FusedLaunch(32, 2, low=True), FusedLaunch(64, 4), FusedLaunch(64, 4, low=True),
        FusedLaunch(32, 4), FusedLaunch(16, 1, stages=2), FusedLaunch(16, 1, flat=True),
    ]  # fmt: skip


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def log(text: str) -> None:
    print(text, flush=True)


def inputs(batch, length, value_dim, dtype, seed=0, grad=True):
    generator = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, length, HEADS, HEAD_DIM, generator=generator) for _ in range(2))
    v = torch.randn(batch, length, HEADS, value_dim, generator=generator)
    return [x.to("cuda", dtype).requires_grad_(grad) for x in (q, k, v)]


def fused_op(kernel, initial_state=None, output_final_state=False):
    from rebased.ops.triton.fused_chunk import fused_chunk_linear_attention

    def run(q, k, v):
        return fused_chunk_linear_attention(q, k, v, kernel=kernel, initial_state=initial_state,
                                            output_final_state=output_final_state, normalize=True, eps=EPS,
                                            chunk_size=64)  # fmt: skip

    return run


def split_values(run):
    """run with fused_chunk.SPLIT_VALUES set (value dims in power-of-two pieces), as committed after."""
    from rebased.ops.triton import fused_chunk

    def split(q, k, v):
        committed, fused_chunk.SPLIT_VALUES = fused_chunk.SPLIT_VALUES, True
        try:
            return run(q, k, v)
        finally:
            fused_chunk.SPLIT_VALUES = committed

    return split


# ---- 1. accuracy ----------------------------------------------------------------------------------------------


def accuracy_row(name: str, kernel, value_dim: int, dtype, batch=2, length=1000) -> list:
    """Relative RMS errors against float64 of o, dq, dk, dv, d kv0 and the final kv, from a prefix's state."""
    from rebased.ops import LinearAttentionState

    q, k, v = inputs(batch, length, value_dim, dtype, seed=value_dim)
    p = inputs(batch, 9, value_dim, torch.float64, seed=1, grad=False)
    _, prefix = linear_attention_reference(*p, kernel=kernel, output_final_state=True)
    state = LinearAttentionState(prefix.kv.float().requires_grad_(True), prefix.k_sum.float().requires_grad_(True))
    o, final = fused_op(kernel, state, True)(q, k, v)
    ref_o, ref_final = linear_attention_reference(q, k, v, kernel=kernel, initial_state=state, output_final_state=True)
    generator = torch.Generator().manual_seed(2)
    w_o, w_kv = (torch.randn(x.shape, generator=generator).cuda() for x in (o, final.kv))
    leaves = [q, k, v, state.kv]
    grads = torch.autograd.grad((o.double() * w_o).sum() + (final.kv.double() * w_kv).sum(), leaves)
    ref_grads = torch.autograd.grad((ref_o * w_o).sum() + (ref_final.kv * w_kv).sum(), leaves)
    errors = [error_report(o, ref_o)[1], *(error_report(g, r)[1] for g, r in zip(grads, ref_grads))]
    errors.append(error_report(final.kv, ref_final.kv)[1])
    bound = 1e-2 if dtype != torch.float32 else 1e-4
    verdict = "ok" if max(errors) <= bound else f"OFF (bound {bound:g})"
    return [name, str(dtype).removeprefix("torch."), value_dim, *(f"{e:.2e}" for e in errors), verdict]


def accuracy(deadline: Deadline) -> list[list]:
    rows = []
    cases = [("rebased", torch.bfloat16, 5), ("rebased", torch.bfloat16, 16), ("based", torch.bfloat16, 5),
             ("rebased", torch.float32, 5), ("based", torch.float32, 11)]  # fmt: skip
    for name, dtype, value_dim in cases:
        if deadline.left() <= 0:
            break
        kernel = Polynomial.rebased(HEAD_DIM) if name == "rebased" else Polynomial.taylor(HEAD_DIM)
        try:
            rows.append(accuracy_row(name, kernel, value_dim, dtype))
        except Exception as error:  # noqa: BLE001 - a failure is a row that says so
            rows.append([name, str(dtype), value_dim, *["-"] * 6, f"failed: {type(error).__name__}: {error}"[:160]])
        log(" | ".join(map(str, rows[-1])))
        torch.cuda.empty_cache()
    return rows


# ---- 2. the table -----------------------------------------------------------------------------------------------


def entries(kernel: PolynomialType) -> dict[str, Callable]:
    """name -> fn(q, k, v) -> o, for [B, T, H, *] bf16 inputs."""
    from rebased.ops.triton.chunk_states import chunk_states_linear_attention

    def through(mode):
        return lambda q, k, v: linear_attention(q, k, v, mode=mode, backend="triton", kernel=kernel)[0]

    options = dict(kernel=kernel, initial_state=None, output_final_state=False, normalize=True, eps=EPS, chunk_size=64)
    table = {
        "fused": lambda q, k, v: fused_op(kernel)(q, k, v)[0],
        "fused split-values": lambda q, k, v: split_values(fused_op(kernel))(q, k, v)[0],
        "chunk_states": lambda q, k, v: chunk_states_linear_attention(q, k, v, **options)[0],
        "parallel": through("parallel"),
        "auto": through("auto"),
    }
    try:
        from fla.ops.based import fused_chunk_based
        from fla.ops.rebased import parallel_rebased
    except ImportError:
        return table
    table["fla parallel_rebased"] = lambda q, k, v: _first(parallel_rebased(q, k, v))
    table["fla fused_chunk_based"] = lambda q, k, v: _first(fused_chunk_based(q, k, v))
    return table


def _first(result):
    return result[0] if isinstance(result, tuple) else result


def auto_choice(q, v) -> str:
    """What linear_attention(mode="auto", backend="triton") runs for these inputs."""
    import rebased.ops as ops
    from rebased.ops.triton.chunk_dispatch import prefers_fused_chunk

    mode = ops.prefer_fused_chunk(ops.pick_mode(q, "triton", None), q, v, "triton", q.shape[0], q.shape[1])
    if mode == "chunk":
        return "fused" if prefers_fused_chunk(q, v, q.shape[0]) else "chunk_states"
    return mode


def time_entry(fn: Callable, q, k, v) -> tuple[float, float, float]:
    """(forward ms, forward+backward ms, forward+backward peak MiB above the inputs)."""
    import triton.testing

    grad = torch.randn_like(fn(q, k, v))

    def forward():
        with torch.no_grad():
            fn(q, k, v)

    def both():
        torch.autograd.grad(fn(q, k, v), (q, k, v), grad)

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    both()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median")

    return bench(forward), bench(both), peak


def shapes(lengths=LENGTHS, value_dims=VALUE_DIMS) -> list[tuple[int, int, int]]:
    """(batch, length, value dim) of the table's rows."""
    few = [(*FEW_PAIRS, 5)] if tuple(lengths) == LENGTHS else []  # with the default lengths only
    return [(BATCH, length, value_dim) for value_dim in value_dims for length in lengths] + few


def table(deadline: Deadline, names: tuple[str, ...] | None = None, label: str = "", lengths=LENGTHS,
          value_dims=VALUE_DIMS) -> list[dict]:  # fmt: skip
    kernel = Polynomial.rebased(HEAD_DIM)
    fns = entries(kernel)
    rows = []
    for batch, length, value_dim in shapes(lengths, value_dims):
        q, k, v = inputs(batch, length, value_dim, torch.bfloat16)
        for name, fn in fns.items():
            if names is not None and name not in names:
                continue
            row = dict(batch=batch, length=length, value_dim=value_dim, entry=name + label, fwd=math.nan,
                       both=math.nan, peak=math.nan, note="")  # fmt: skip
            if name == "auto":
                row["note"] = f"runs {auto_choice(q, v)}"
            if deadline.left() <= 0:
                row["note"] = "skipped: time limit"
            else:
                try:
                    row["fwd"], row["both"], row["peak"] = time_entry(fn, q, k, v)
                except Exception as error:  # noqa: BLE001 - a failure is a row that says so
                    row["note"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:100]}"
            rows.append(row)
            log(f"B{batch} L{length} V{value_dim} {row['entry']}: fwd {row['fwd']:.3f} ms, fwd+bwd {row['both']:.3f} "
                f"ms, {row['peak']:.0f} MiB {row['note']}")  # fmt: skip
            torch.cuda.empty_cache()
        del q, k, v
    return rows


def table_markdown(rows: list[dict]) -> str:
    fused = {(r["batch"], r["length"], r["value_dim"]): r["both"] for r in rows if r["entry"] == "fused"}
    lines = []
    for r in rows:
        base = fused.get((r["batch"], r["length"], r["value_dim"]), math.nan)
        ratio = r["both"] / base if base == base and r["both"] == r["both"] else math.nan
        lines.append([f"B{r['batch']} L{r['length']} V{r['value_dim']}", r["entry"], f"{r['fwd']:.3f}",
                      f"{r['both']:.3f}", f"{ratio:.2f}", f"{r['peak']:.0f}", r["note"]])  # fmt: skip
    headers = ["shape", "entry", "fwd ms", "fwd+bwd ms", "fwd+bwd / fused", "peak MiB (fwd+bwd)", "note"]
    return markdown_table(headers, lines)


# ---- 3. the sweep ----------------------------------------------------------------------------------------------


SWEEP_KERNELS = {"rebased": Polynomial.rebased, "based": Polynomial.taylor}


def launch_table_name(value_dim: int, kernel: PolynomialType) -> str:
    """The fused_chunk.py table that launches this value dim and kernel on the GPU."""
    from rebased.ops.triton.fused_chunk import gpu_launch_table
    from rebased.ops.triton.inputs import PolynomialArgs

    return gpu_launch_table(value_dim, PolynomialArgs.of(kernel))


def use_launches(launches: dict, value_dim: int, kernel: PolynomialType) -> None:
    """Put launches into the table that serves value_dim and kernel (in this process only)."""
    from rebased.ops.triton import fused_chunk

    fused_chunk.GPU_LAUNCH_TABLES[launch_table_name(value_dim, kernel)].update(launches)


def candidate_errors(kernel, value_dim: int) -> dict[str, float]:
    """Relative RMS error against float64 of what each kernel writes, at B 2, L 300, bf16: the forward's o, dq's
    dq, dkdv's worst of dk and dv."""
    q, k, v = inputs(2, 300, value_dim, torch.bfloat16, seed=3)
    o, _ = fused_op(kernel)(q, k, v)
    ref, _ = linear_attention_reference(q, k, v, kernel=kernel)
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(4)).cuda()
    grads = torch.autograd.grad((o.double() * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    dq, dk, dv = (error_report(g, r)[1] for g, r in zip(grads, ref_grads))
    return dict(fwd=error_report(o, ref)[1], dq=dq, dkdv=max(dk, dv))


def kernel_times(kernel, value_dim: int) -> dict[str, float]:
    """Each fused kernel alone at B 512, L 2048, bf16 (ms, median)."""
    import triton.testing

    from rebased.ops.triton import fused_chunk as F
    from rebased.ops.triton.inputs import PolynomialArgs
    from rebased.ops.triton.sequences import Sequences

    q, k, v = (x.detach().flatten(0, 1) for x in inputs(BATCH, 2048, value_dim, torch.bfloat16, grad=False))
    table_ = F.sequence_table(Sequences(batch=BATCH, length=2048), q.device)
    poly = PolynomialArgs.of(kernel)
    common = dict(table=table_, poly=poly, normalize=True, eps=EPS)
    _, o32, den, _ = F.launch_forward(q, k, v, None, final=False, save32=True, **common)
    do = torch.randn_like(v)
    runs = {
        "fwd": lambda: F.launch_forward(q, k, v, None, final=False, save32=True, **common),
        "dq": lambda: F.launch_dq(q, k, v, do, o32, den, None, **common),
        "dkdv": lambda: F.launch_dkdv(q, k, v, do, o32, den, None, False, **common),
    }
    return {name: triton.testing.do_bench(run, warmup=5, rep=40, return_mode="median") for name, run in runs.items()}


SWEEP_RESERVE_S = 60.0  # seconds the sweep leaves for the table's rows with its choice


def sweep(deadline: Deadline, value_dim: int, kernel: PolynomialType,
          reserve_s: float = SWEEP_RESERVE_S) -> tuple[list[list], dict]:  # fmt: skip
    """Rows per candidate and the best accurate launch per kernel (absent where no candidate was accurate), at
    value_dim for this polynomial (its table: launch_table_name)."""
    from rebased.ops.triton import fused_chunk

    code = dict(fused_chunk.GPU_LAUNCH_TABLES[launch_table_name(value_dim, kernel)])
    rows, best = [], {}
    for launch in candidates(value_dim):
        if deadline.left() <= reserve_s:
            rows.append([str(launch), "-", "-", "-", "-", "skipped: time limit"])
            continue
        use_launches(dict.fromkeys(("fwd", "dq", "dkdv"), launch), value_dim, kernel)
        try:
            errors = candidate_errors(kernel, value_dim)
            times = kernel_times(kernel, value_dim)
        except Exception as error:  # noqa: BLE001 - a failure is a row that says so
            rows.append([str(launch), "-", "-", "-", "-", f"failed: {type(error).__name__}: {str(error)[:100]}"])
            log(" | ".join(rows[-1]))
            continue
        finally:
            torch.cuda.empty_cache()
        for name, ms in times.items():
            if errors[name] <= 1e-2 and (name not in best or ms < best[name][1]):
                best[name] = (launch, ms)
        cells = [f"{times[n]:.3f} ({errors[n]:.1e})" for n in ("fwd", "dq", "dkdv")]
        rows.append([str(launch), *cells, f"{sum(times.values()):.3f}",
                     "ok" if max(errors.values()) <= 1e-2 else "OFF: some kernel > 1e-2"])  # fmt: skip
        log(" | ".join(rows[-1]))
    use_launches(code, value_dim, kernel)
    return rows, {name: launch for name, (launch, _) in best.items()}


# ---- no GPU: compile the candidates -----------------------------------------------------------------------------


def compile_candidates() -> None:
    """Registers, spills and shared memory of each candidate's kernels for sm_90a (ReBased, bf16, q/k 16, v 5 and
    16), through benchmarks/compile_check.py."""
    sys.path.insert(0, str(Path(__file__).parent))
    from compile_check import compile_one

    from rebased.ops.triton import fused_chunk as F
    from rebased.ops.triton.inputs import PolynomialArgs

    poly = PolynomialArgs.of(Polynomial.rebased(HEAD_DIM))
    kernels = {"fwd": F.fused_chunk_fwd_kernel, "dq": F.fused_chunk_dq_kernel, "dkdv": F.fused_chunk_dkdv_kernel}
    flags = {"fwd": dict(INIT=False, FINAL=False, SAVE32=True), "dq": dict(INIT=False),
             "dkdv": dict(DFINAL=False, DINIT=False)}  # fmt: skip
    fp32_pointers = {"o32", "den", "state0", "state", "dstate", "dstate0"}
    rows = []
    for value_dim in COMPILE_VALUE_DIMS:
        dims = F.Dims.of(HEAD_DIM, value_dim)
        for launch in candidates(value_dim):
            for name, kernel in kernels.items():
                options = launch.options(torch.bfloat16)
                compiler = {"num_warps": options.pop("num_warps")} | ({"maxnreg": options.pop("maxnreg")}
                                                                      if "maxnreg" in options else {})  # fmt: skip
                consts = dict(**poly.flags(), BD=dims.bd, BV=dims.bv, PREC="tf32", NORMALIZE=True, CLAMP=True,
                              **flags[name], **options)  # fmt: skip
                if name != "fwd":
                    consts["BVK"] = dims.bvk
                report = compile_one(kernel, consts, fp32_pointers, {"H", "D", "V"}, compiler, "bf16")
                rows.append([f"v {value_dim}", str(launch), name, report])
                log(" | ".join(rows[-1]))
    log(markdown_table(["dims", "launch", "kernel", "sm_90a"], rows))


# ---- main ----------------------------------------------------------------------------------------------------


def environment() -> str:
    from environment import versions  # benchmarks/ is on the path when this script runs

    try:
        import fla

        peers = f"fla {getattr(fla, '__version__', '?')}"
    except ImportError:
        peers = "fla not installed"
    return f"{versions()}; {peers}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for fused_chunk.md and .json")
    parser.add_argument("--time-limit", type=float, default=540.0, help="seconds after which nothing new starts")
    parser.add_argument("--no-sweep", action="store_true", help="skip the launch sweep (stages 3 and 4)")
    parser.add_argument("--sweep-only", action="store_true", help="only the launch sweep (stage 3)")
    value_help = "the value dim the sweep times (default 5; 10 is the d_model 128 MQAR models')"
    parser.add_argument("--sweep-value-dim", type=int, default=5, help=value_help)
    parser.add_argument("--sweep-kernel", choices=sorted(SWEEP_KERNELS), default="rebased",
                        help="the polynomial the sweep times: rebased (default; GPU_LAUNCHES) or based "
                        "(GPU_LAUNCHES_LOW_TERMS); past value dim 8 GPU_LAUNCHES_WIDE and "
                        "GPU_LAUNCHES_WIDE_LOW_TERMS, past 16 both GPU_LAUNCHES_WIDER")  # fmt: skip
    parser.add_argument("--table-only", action="store_true", help="only the table (stage 2)")
    parser.add_argument("--entries", default=None, help="the table's entries, comma-separated (default: all)")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="the table's L, comma-separated")
    parser.add_argument("--value-dims", default=",".join(map(str, VALUE_DIMS)), help="the table's v, comma-separated")
    parser.add_argument("--compile", action="store_true", help="no GPU: compile each candidate for sm_90a and stop")
    args = parser.parse_args()
    if args.compile:
        compile_candidates()
        return
    deadline = Deadline(args.time_limit)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    log(env)
    names = None if args.entries is None else tuple(args.entries.split(","))
    lengths, value_dims = (tuple(int(n) for n in text.split(",")) for text in (args.lengths, args.value_dims))
    accuracy_rows = [] if args.sweep_only or args.table_only else accuracy(deadline)
    rows = [] if args.sweep_only else table(deadline, names, lengths=lengths, value_dims=value_dims)
    value_dim, kernel = args.sweep_value_dim, SWEEP_KERNELS[args.sweep_kernel](HEAD_DIM)
    if args.table_only:
        write(out, env, accuracy_rows, rows, [], {}, value_dim, kernel)
        return
    reserve_s = 0.0 if args.sweep_only else SWEEP_RESERVE_S
    sweep_rows, best = ([], {}) if args.no_sweep else sweep(deadline, value_dim, kernel, reserve_s)
    if best and not args.sweep_only and args.sweep_kernel == "rebased":  # the table times ReBased
        use_launches(best, value_dim, kernel)
        rows += table(deadline, names=("fused",), label=" (sweep's best)")
    write(out, env, accuracy_rows, rows, sweep_rows, best, value_dim, kernel)


def write(out: Path, env, accuracy_rows, rows, sweep_rows, best, value_dim: int, kernel: PolynomialType) -> None:
    entries = "".join(f'        "{n}": {launch},\n' for n, launch in best.items())
    best_line = f"{launch_table_name(value_dim, kernel)} = {{\n{entries}    }}"
    parts = [f"# Fused chunk kernels on the GPU\n\n{env}\n\n`{' '.join(sys.argv)}`"]
    if accuracy_rows:
        header = ["kernel", "inputs", "v", "o", "dq", "dk", "dv", "d kv0", "final kv", "verdict"]
        parts.append("## Accuracy (the code's launches) against float64: relative RMS error\n\n"
                     + markdown_table(header, accuracy_rows))  # fmt: skip
    if rows:
        parts.append(f"## Forward and forward+backward: B {BATCH} (and {FEW_PAIRS[0]}), {HEADS} heads, q/k {HEAD_DIM}, "
                     "bf16, ReBased\n\n" + table_markdown(rows))  # fmt: skip
    if sweep_rows:
        header = ["launch", "fwd", "dq", "dkdv", "sum", "verdict"]
        parts.append(f"## Launch sweep: each kernel alone at B 512, L 2048, v {value_dim}, "
                     f"{'Based' if kernel.c0 > 0 else 'ReBased'} (ms, and its error "
                     "against float64 at B 2, L 300)\n\n" + markdown_table(header, sweep_rows)
                     + f"\n\nFastest accurate per kernel:\n\n    {best_line}")  # fmt: skip
    text = "\n\n".join(parts) + "\n"
    (out / "fused_chunk.md").write_text(text)
    record = dict(environment=env, accuracy=accuracy_rows, table=rows, sweep=sweep_rows,
                  best={n: dataclasses.asdict(launch) for n, launch in best.items()})  # fmt: skip
    (out / "fused_chunk.json").write_text(json.dumps(record, indent=1, default=str))
    log("\n" + text)


if __name__ == "__main__":
    main()
