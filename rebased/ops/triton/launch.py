"""How the fused kernels are launched: compiled or interpreted, at which dot precision, and the step down to a
smaller launch where a compiled kernel needs more shared memory than the GPU has."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import torch
from triton.runtime.errors import OutOfResources


def interpreting() -> bool:
    """Whether TRITON_INTERPRET=1 runs the kernels as Python on CPU tensors (fixed small launches, no compile)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


DEFAULT_SMS = 132  # an H200's, for tensors not on a GPU (the interpreter)


@functools.lru_cache(maxsize=8)
def sm_count(device: torch.device) -> int:
    """The streaming multiprocessors of device (DEFAULT_SMS for a CPU tensor): what launch sizes are counted
    against, so that a grid fills the GPU."""
    if device.type != "cuda":
        return DEFAULT_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def dot_precision(dtype: torch.dtype, fp32: str) -> str:
    """The input_precision of a kernel's tl.dot calls for inputs of `dtype`. 16-bit inputs: "tf32" (their own
    dots are exact whatever it says; the fp32 tiles beside them, scores and states, take tf32). fp32 inputs:
    `fp32`, which each kernel family names because they differ and each is what its GPU tests passed with
    (PARALLEL_FP32_DOTS, CHUNK_FP32_DOTS say why)."""
    return fp32 if dtype == torch.float32 else "tf32"


Rung = TypeVar("Rung", bound=Hashable)
# (kernel name, ladder, what else decides the compile) -> index of the first rung of the ladder that fits
FITTED_RUNGS: dict[tuple, int] = {}


def launch_fitting(name: str, ladder: Sequence[Rung], launch: Callable[[Rung], None], **compiled_with) -> None:
    """launch(rung) with the first rung of ladder (the tuned launch first, then ones needing less shared memory)
    whose compiled kernel fits the GPU. A kernel's shared memory is known only once Triton has compiled it, and
    Triton versions disagree on it, so the step down is found by trying: Triton raises OutOfResources before the
    kernel runs, so a refused rung has done nothing. compiled_with: whatever besides the rung decides the compile
    (dtype, dims, constexprs); with name and the ladder it keys the rung remembered for the next launch."""
    key = (name, tuple(ladder), tuple(sorted(compiled_with.items(), key=lambda item: item[0])))
    for index in range(FITTED_RUNGS.get(key, 0), len(ladder)):
        try:
            launch(ladder[index])
        except OutOfResources:
            if index == len(ladder) - 1:
                raise
            continue
        FITTED_RUNGS[key] = index
        return
