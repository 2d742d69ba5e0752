"""The Triton versions the compiled kernels are trusted on: those the GPU tests passed with.

A compiled kernel can be right on one Triton version and wrong on another (Triton 3.6 mis-compiles some of the
chunk kernels' 3D tiles at some warp counts, where the interpreter runs them right), and the package accepts
any triton >= 3.0. So backend="auto" (linear attention, LayerNorm) runs the fused kernels only on a Triton
whose major.minor is in VERIFIED_TRITON, and torch elsewhere, with one warning; an explicit backend="triton"
runs them anyway, with one warning. To trust another version, run the GPU tests on it
(`pytest -m gpu tests/` on a CUDA machine) and add it here with their log, or set REBASED_TRUST_TRITON=1.
The interpreter (TRITON_INTERPRET=1) runs the kernels' Python and compiles nothing: any version is trusted.
"""

from __future__ import annotations

import os
import warnings

import triton

from rebased.ops.triton.launch import interpreting

# major.minor -> the log of the full GPU test run (`pytest -m gpu tests/` on an H200) that passed on it
VERIFIED_TRITON = {"3.6": "benchmarks/results/h200/gpu_tests.log"}
TRUST_VARIABLE = "REBASED_TRUST_TRITON"  # "1": trust the installed version
WARNED: set[str] = set()  # the warnings given in this process (each is given once)


class UnverifiedTritonWarning(UserWarning):
    """The installed Triton is not one the fused kernels passed the GPU tests on."""


def installed_version() -> str:
    """The installed triton's major.minor."""
    major, minor, *_ = triton.__version__.split(".")
    return f"{major}.{minor}"


def trusted() -> bool:
    return interpreting() or installed_version() in VERIFIED_TRITON or os.environ.get(TRUST_VARIABLE) == "1"


def check_trusted(consequence: str) -> bool:
    """trusted(); where not, warns once per process and consequence (what the caller does about it)."""
    if trusted():
        return True
    message = (
        f"triton {triton.__version__}: the fused kernels passed the GPU tests on Triton "
        f"{', '.join(sorted(VERIFIED_TRITON))} only; {consequence}. Run `pytest -m gpu tests/` on this version, "
        f"then set {TRUST_VARIABLE}=1 (or add it to rebased.ops.triton.versions.VERIFIED_TRITON)."
    )
    if message not in WARNED:
        WARNED.add(message)
        warnings.warn(message, UnverifiedTritonWarning, stacklevel=3)
    return False
