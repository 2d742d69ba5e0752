"""Op benchmark: every (mode, backend) checked against the float64 reference, then timed across lengths.

On the CPU this is the quick demonstration behind `rebased bench`; on a GPU the same code times the
Triton backend. Times are medians of `repeats` runs after one warm-up. The GPU suite beside the peers
(`rebased bench --suite`) is rebased/bench/gpu_suite.py. A config is checked when it is made, so a bad
one fails before anything is computed.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rebased.feature_maps import FEATURE_MAPS, make_feature_map
from rebased.ops import MODES, linear_attention, linear_attention_reference
from rebased.ops.common import check_choice
from rebased.testing import error_report

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
BENCH_BACKENDS = ("torch", "triton")


def check_device(name: str) -> torch.device:
    """The torch device `name` (cpu, cuda, cuda:1) if this machine has it, else ValueError saying why."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"device {name!r}: not a device name (cpu, cuda, cuda:1)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: only cpu and cuda are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {name!r}: {why} (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def check_triton(device: str) -> None:
    """The triton backend needs the triton package and CUDA tensors (or the interpreter, TRITON_INTERPRET=1)."""
    if importlib.util.find_spec("triton") is None:
        raise ValueError("backend 'triton' needs the triton package (pip install triton), which is not installed")
    if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend 'triton' runs on CUDA tensors, not on {device!r} (or set TRITON_INTERPRET=1)")


@dataclass(frozen=True)
class OpBenchConfig:
    feature_map: str = "rebased"  # a polynomial map: rebased, square, taylor, ...
    batch: int = 1
    heads: int = 4
    head_dim: int = 16
    value_dim: int = 64
    lengths: tuple[int, ...] = (256, 1024, 4096)
    modes: tuple[str, ...] = MODES
    backends: tuple[str, ...] = ("torch",)
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 3
    check_length: int = 65  # awkward on purpose: one past a chunk
    max_recurrent_length: int = 1024  # the recurrent scan is a Python loop over time: skip it past this
    seed: int = 0

    def __post_init__(self):
        for name in ("batch", "heads", "head_dim", "value_dim", "repeats", "check_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lengths or any(length < 1 for length in self.lengths):
            raise ValueError(f"lengths must be one or more integers >= 1, got {self.lengths}")
        for mode in self.modes:
            check_choice("mode", mode, MODES)
        for backend in self.backends:
            check_choice("backend", backend, BENCH_BACKENDS)
        check_choice("dtype", self.dtype, DTYPES)
        check_device(self.device)
        if "triton" in self.backends:
            check_triton(self.device)
        check_polynomial(self.feature_map, self.head_dim, self.heads)


def check_polynomial(feature_map: str, head_dim: int, heads: int) -> None:
    """The benchmarks time the ops' kernel-trick path, so the map must have a polynomial kernel."""
    if make_feature_map(feature_map, head_dim, heads).kernel is None:
        polynomial = ", ".join(n for n, make in FEATURE_MAPS.items() if make(head_dim, heads).kernel is not None)
        raise ValueError(
            f"feature map {feature_map!r} has no polynomial kernel, which the op benchmark needs: choose {polynomial}"
        )


@dataclass
class CheckRow:
    mode: str
    backend: str
    output_err: float  # relative RMS error against float64
    state_err: float
    grad_err: float  # worst relative RMS over dq, dk, dv


@dataclass
class TimeRow:
    mode: str
    backend: str
    length: int
    forward_ms: float
    backward_ms: float  # forward + backward


def relative_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return error_report(actual, expected)[1]


def _inputs(config: OpBenchConfig, length: int, generator: torch.Generator, requires_grad: bool):
    fmap = make_feature_map(config.feature_map, config.head_dim, config.heads)
    shape = (config.batch, length, config.heads)
    make = lambda dim: torch.randn(*shape, dim, generator=generator)  # noqa: E731
    q, k, v = make(config.head_dim), make(config.head_dim), make(config.value_dim)
    with torch.no_grad():  # the map's parameters live on the CPU: prepare there, then move
        q, k = fmap.prepare(q, k)
    q, k, v = (x.to(config.device, DTYPES[config.dtype]) for x in (q, k, v))
    for x in (q, k, v):
        x.requires_grad_(requires_grad)
    return q, k, v, fmap


def check_modes(config: OpBenchConfig) -> list[CheckRow]:
    """Each (mode, backend) against the reference: outputs, final state and gradients, continuing a prefix."""
    generator = torch.Generator().manual_seed(config.seed)
    q, k, v, fmap = _inputs(config, config.check_length, generator, requires_grad=True)
    # A state a real prefix left behind (z = sum phi(k) is consistent with kv), not random numbers.
    prefix_q, prefix_k, prefix_v, _ = _inputs(config, 17, generator, requires_grad=False)
    _, prefix_state = linear_attention_reference(
        prefix_q, prefix_k, prefix_v, kernel=fmap.kernel, output_final_state=True
    )
    state = tuple(x.to(config.device, torch.float32) for x in prefix_state)
    options = dict(kernel=fmap.kernel, initial_state=state, output_final_state=True, normalize=fmap.normalize)
    ref_o, ref_state = linear_attention_reference(q, k, v, **options)
    ref_grads = torch.autograd.grad(ref_o.sum(), (q, k, v))
    rows = []
    for backend in config.backends:
        for mode in config.modes:
            o, state = linear_attention(q, k, v, mode=mode, backend=backend, **options)
            grads = torch.autograd.grad(o.float().sum(), (q, k, v))
            grad_err = max(relative_rms(g, r) for g, r in zip(grads, ref_grads))
            rows.append(CheckRow(mode, backend, relative_rms(o, ref_o), relative_rms(state.kv, ref_state.kv), grad_err))
    return rows


def _median_ms(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up: first-call allocation and compilation stay out of the numbers
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _forward_backward(run: Callable) -> None:
    run()[0].float().sum().backward()


def time_modes(config: OpBenchConfig, progress: Callable[[str], None] = lambda _: None) -> list[TimeRow]:
    sync = torch.cuda.synchronize if config.device.startswith("cuda") else (lambda: None)
    generator = torch.Generator().manual_seed(config.seed)
    rows = []
    for length in config.lengths:
        q, k, v, fmap = _inputs(config, length, generator, requires_grad=True)
        options = dict(kernel=fmap.kernel, normalize=fmap.normalize)
        for backend in config.backends:
            for mode in config.modes:
                if mode == "recurrent" and length > config.max_recurrent_length:
                    rows.append(TimeRow(mode, backend, length, math.nan, math.nan))
                    continue
                progress(f"{mode}/{backend} T={length}")
                run = functools.partial(linear_attention, q, k, v, mode=mode, backend=backend, **options)
                with torch.no_grad():
                    forward = _median_ms(run, config.repeats, sync)
                both = _median_ms(functools.partial(_forward_backward, run), config.repeats, sync)
                rows.append(TimeRow(mode, backend, length, forward, both))
    return rows
