"""Compile Triton kernels for the H200 (sm_90a) on a machine without a GPU; report registers and spills.

    python benchmarks/compile_check.py            # the chunk kernels at their TILE_CONFIGS and the parallel ones
    python benchmarks/compile_check.py --configs "sums=128:8:3d output=256:8:sel"   # entries as GroupTiles.parse_set

Catches what only the compiler sees (the interpreter runs kernels as Python: loop-carried type changes,
unsupported ops) before device time is spent, and reads the cubin's registers and stack (where spills go)
for the suite's shapes (bf16, q/k dim 16, v dim 64, ReBased). The local triton may differ from the device's
(3.6.0 there): a clean compile here is evidence, not proof.
"""

from __future__ import annotations

import argparse
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
from rebased.tables import markdown_table

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
BF16_IN = {"q", "k", "v", "x", "y", "do", "o", "dq", "dk", "dv"}


def signature(kernel, consts: dict, fp32_pointers: set[str], ints: set[str]) -> dict:
    """Types for every argument: constexprs, i32 for sizes, fp32 scalars, bf16 or fp32 pointers."""
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ints:
            sig[name] = "i32"
        elif name in fp32_pointers:
            sig[name] = "*fp32"
        elif name in BF16_IN:
            sig[name] = "*bf16"
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


# ReBased, q/k 16, v 64, as the GPU lays it out (Layout.of would take the interpreter's sizes under TRITON_INTERPRET)
SUITE_LAYOUT = CS.Layout(chunk=256, block=64, bd=16, bv=64, num_square=16, num_blocks=16)
LAYOUT = SUITE_LAYOUT.constexprs()
TILES = dict(**LAYOUT, BM=64, BN=64, HAS0=False, HAS1=False, PREC="tf32")


def tile_config(name: str) -> tuple[dict, int]:
    """G and SEL (constexprs) and warps of chunk-states kernel `name`, as the code launches it for bf16."""
    launch = CS._tile_config(name, SUITE_LAYOUT, torch.bfloat16)
    return launch, launch.pop("num_warps")


def cases() -> list[tuple]:
    """name, kernel, constexprs, fp32 pointers, i32 args, num_warps (read when called: main sets the knobs)."""
    return [  # name, kernel, constexprs, fp32 pointers, i32 args, num_warps
        *[(f"chunk_sums ({'bwd' if grad else 'fwd'})", CS.chunk_sums_kernel,
           dict(**LAYOUT, **tile_config("sums")[0], BC=64, HAS1=False, GRAD=grad, PREC="tf32"), {"r", "dd", "s", "z"},
           {"H", "D", "V", "SHIFT"}, tile_config("sums")[1]) for grad in (False, True)],
        ("scan", CS.scan_kernel, dict(BD=16, BV=64, SV=16, U=8, REVERSE=False), {"s", "z"}, {"H"}, 4),
        ("scan (reverse)", CS.scan_kernel, dict(BD=16, BV=64, SV=16, U=8, REVERSE=True), {"s", "z"}, {"H"}, 4),
        ("output", CS.output_kernel, dict(**TILES, **tile_config("output")[0], NORMALIZE=True, CLAMP=True, SAVE32=True),
         {"s", "z", "o32", "den"}, {"H", "D", "V"}, tile_config("output")[1]),
        ("dkdv", CS.dkdv_kernel, dict(**TILES, **tile_config("dkdv")[0]), {"r", "dd", "ds", "dz"}, {"H", "D", "V"},
         tile_config("dkdv")[1]),
        ("dq", CS.dq_kernel, dict(**TILES, **tile_config("dq")[0]), {"r", "dd", "s", "z"}, {"H", "D", "V"},
         tile_config("dq")[1]),
        ("parallel dkdv (reference)", P.parallel_dkdv_kernel,
         dict(BM=64, BN=64, BD=16, BV=64, HAS0=False, HAS1=False, PREC="tf32"), {"r", "dd"}, {"H", "D", "V"}, 4),
        ("parallel dq (reference)", P.parallel_dq_kernel,
         dict(BM=64, BN=64, BD=16, BV=64, HAS0=False, HAS1=False, PREC="tf32"), {"r", "dd"}, {"H", "D", "V"}, 4),
        ("parallel fwd (reference)", P.parallel_fwd_kernel,
         dict(BM=64, BN=64, BD=16, BV=64, HAS0=False, HAS1=False, NORMALIZE=True, CLAMP=True, SAVE32=True, PREC="tf32"),
         {"o32", "den"}, {"H", "D", "V"}, 4),
        ("parallel row terms", P.parallel_row_terms_kernel, dict(BR=64, BV=64, CLAMP=True), {"o", "den", "r", "dd"},
         {"R", "V"}, 4),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="", help='TILE_CONFIGS entries, e.g. "dkdv=64:4:3d dq=64:4:sel"')
    args = parser.parse_args()
    CS.TILE_CONFIGS = CS.GroupTiles.parse_set(args.configs, CS.TILE_CONFIGS)
    rows = []
    for name, kernel, consts, fp32_pointers, ints, warps in cases():
        sig = signature(kernel, consts, fp32_pointers, ints)
        for table in ("table", "seqs"):  # int32 row tables
            if table in sig:
                sig[table] = "*i32"
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                                      target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})  # fmt: skip
            report = f"ok: {resource_usage(compiled.asm['cubin'])}, shared {compiled.metadata.shared} B"
        except Exception as error:  # noqa: BLE001  (the point is to see every failure)
            report = f"FAILED: {type(error).__name__}: {str(error)[:300]}"
        rows.append([name, warps, report])
        print(" | ".join(map(str, rows[-1])), flush=True)
    print(markdown_table(["kernel", "warps", f"sm_90a, triton {triton.__version__}"], rows))


if __name__ == "__main__":
    main()
