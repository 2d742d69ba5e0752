"""Compile Triton kernels for the H200 (sm_90a) on a machine without a GPU; report registers and spills.

    python benchmarks/compile_check.py            # every kernel as the code launches it at the suite's dims
    python benchmarks/compile_check.py --dims 32x64,32x128 --dtypes bf16,fp32 --kernels output,parallel

Catches what only the compiler sees (the interpreter runs kernels as Python: loop-carried type changes,
unsupported ops) before device time is spent, and reads the cubin's registers and stack (where spills go)
for ReBased at the suite's shapes (bf16, q/k dim 16, v dim 64) or those --dims and --dtypes name, with
each kernel's shared memory against the H200's limit (a launch over it steps down on the GPU: launch_fitting).
Each kernel compiles at its first rung (chunk_states.tile_launch, parallel.GPU_CONFIGS). The local triton may
differ from the device's (rebased.ops.triton.versions): a clean compile here is evidence, not proof.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import rebased.ops.triton.chunk_states as CS
import rebased.ops.triton.parallel as P
from rebased.ops.kernels import Polynomial
from rebased.ops.triton.inputs import PolynomialArgs
from rebased.ops.triton.launch import dot_precision
from rebased.tables import markdown_table

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
INPUTS = {"q", "k", "v", "x", "y", "do", "o", "dq", "dk", "dv", "dx", "dy"}


def signature(kernel, consts: dict, fp32_pointers: set[str], ints: set[str], inputs: str) -> dict:
    """Types for every argument: constexprs, i32 for sizes, fp32 scalars, fp32 or input-dtype pointers."""
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ints:
            sig[name] = "i32"
        elif name in fp32_pointers:
            sig[name] = "*fp32"
        elif name in INPUTS:
            sig[name] = f"*{inputs}"
        else:
            sig[name] = "fp32"
    return sig


def resource_usage(cubin: bytes) -> str:
    """Registers and stack (spills land there) a thread, from cuobjdump -res-usage on the compiled cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as handle:
            handle.write(cubin)
        text = subprocess.run([CUOBJDUMP, "-res-usage", path], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return f"{found.group(1)} registers, stack {found.group(2)} B" if found else "usage not found"


SHARED_LIMIT = 232448  # bytes of shared memory one H200 block may use (Triton's OutOfResources bound)


def gpu_layout(head_dim: int, value_dim: int) -> CS.Layout:
    """ReBased's chunk-states layout as the GPU launches it (Layout.of takes the interpreter's sizes under
    TRITON_INTERPRET, so the GPU's chunk and block are spelled out here)."""
    layout = CS.Layout.of(head_dim, value_dim, PolynomialArgs.of(Polynomial.rebased(head_dim)))
    return dataclasses.replace(layout, chunk=CS.CHUNK, block=64)


def cases(head_dim: int, value_dim: int, dtype: torch.dtype) -> list[tuple]:
    """name, kernel, constexprs, fp32 pointers, i32 args, launch options: every kernel as the code launches it
    for ReBased at these dims and input dtype."""
    layout = gpu_layout(head_dim, value_dim)
    bd, bv, prec = layout.bd, layout.bv, dot_precision(dtype, CS.CHUNK_FP32_DOTS)
    tiles = dict(**layout.constexprs(), BM=layout.block, BN=layout.block, HAS0=False, HAS1=False, PREC=prec)

    def tile_config(name: str) -> tuple[dict, dict]:
        launch = CS.tile_launch(name, layout, dtype).options()
        return launch, dict(num_warps=launch.pop("num_warps"))

    def parallel(kernel: int) -> tuple[dict, dict]:
        launch = P.GPU_CONFIGS[kernel].options(head_dim, value_dim)
        options = dict(num_warps=launch.pop("num_warps"), num_stages=launch.pop("num_stages"))
        return dict(**launch, HAS0=False, HAS1=False, PREC=dot_precision(dtype, P.PARALLEL_FP32_DOTS)), options

    sums, sums_options = tile_config("sums")
    scan = dict(BD=bd, BV=bv, SV=CS.SCAN_SLICE, U=CS.SCAN_UNROLL)
    ints = {"H", "D", "V"}
    return [  # name, kernel, constexprs, fp32 pointers, i32 args, launch options
        *[(f"chunk_sums ({'bwd' if grad else 'fwd'})", CS.chunk_sums_kernel,
           dict(**layout.constexprs(), **sums, BC=layout.block, HAS1=False, GRAD=grad, PREC=prec),
           {"r", "dd", "s", "z"}, ints | {"SHIFT"}, sums_options) for grad in (False, True)],
        ("scan", CS.scan_kernel, dict(**scan, REVERSE=False), {"s", "z"}, {"H"}, dict(num_warps=4)),
        ("scan (reverse)", CS.scan_kernel, dict(**scan, REVERSE=True), {"s", "z"}, {"H"}, dict(num_warps=4)),
        ("output", CS.output_kernel,
         dict(**tiles, **tile_config("output")[0], NORMALIZE=True, CLAMP=True, SAVE32=dtype != torch.float32),
         {"s", "z", "o32", "den"}, ints, tile_config("output")[1]),
        ("dkdv", CS.dkdv_kernel, dict(**tiles, **tile_config("dkdv")[0]), {"r", "dd", "ds", "dz"}, ints,
         tile_config("dkdv")[1]),
        ("dq", CS.dq_kernel, dict(**tiles, **tile_config("dq")[0]), {"r", "dd", "s", "z"}, ints,
         tile_config("dq")[1]),
        ("parallel fwd", P.parallel_fwd_kernel,
         dict(**parallel(0)[0], NORMALIZE=True, CLAMP=True, SAVE32=dtype != torch.float32), {"o32", "den"},
         ints, parallel(0)[1]),
        ("parallel dkdv", P.parallel_dkdv_kernel, parallel(1)[0], {"r", "dd"}, ints, parallel(1)[1]),
        ("parallel dq", P.parallel_dq_kernel, parallel(2)[0], {"r", "dd"}, ints, parallel(2)[1]),
        ("parallel row terms", P.parallel_row_terms_kernel, dict(BR=64, BV=bv, CLAMP=True), {"o", "den", "r", "dd"},
         {"R", "V"}, dict(num_warps=4)),
    ]  # fmt: skip


def compile_one(kernel, consts: dict, fp32_pointers: set[str], ints: set[str], options: dict, inputs: str) -> str:
    """Compile for sm_90a; registers, stack and shared memory, or the failure."""
    sig = signature(kernel, consts, fp32_pointers, ints, inputs)
    for table in ("table", "seqs"):  # int32 row tables
        if table in sig:
            sig[table] = "*i32"
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                                  target=GPUTarget("cuda", 90, 32), options=options)  # fmt: skip
    except Exception as error:  # noqa: BLE001  (the point is to see every failure)
        return f"FAILED: {type(error).__name__}: {str(error)[:300]}"
    shared = compiled.metadata.shared
    fits = "" if shared <= SHARED_LIMIT else f" OVER the {SHARED_LIMIT} B limit"
    return f"ok: {resource_usage(compiled.asm['cubin'])}, shared {shared} B{fits}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="16x64", help="q/k x v dims, comma-separated: 16x64,32x128")
    parser.add_argument("--dtypes", default="bf16", help="input dtypes, comma-separated: bf16,fp32")
    parser.add_argument("--kernels", default="", help="only kernels whose names contain one of these: output,dq")
    args = parser.parse_args()
    rows = []
    for dims in args.dims.split(","):
        head_dim, value_dim = map(int, dims.split("x"))
        for inputs in args.dtypes.split(","):
            dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[inputs]
            for name, kernel, consts, fp32_pointers, ints, options in cases(head_dim, value_dim, dtype):
                if args.kernels and not any(part in name for part in args.kernels.split(",")):
                    continue
                report = compile_one(kernel, consts, fp32_pointers, ints, options, inputs)
                rows.append([dims, inputs, name, options["num_warps"], report])
                print(" | ".join(map(str, rows[-1])), flush=True)
    headers = ["q/k x v", "inputs", "kernel", "warps", f"sm_90a, triton {triton.__version__}"]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
