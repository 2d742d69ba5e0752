"""The GPU suite behind `rebased bench --suite`: fixed tokens per call, every (mode, backend) beside the
peers, and the decode step.

Each length T runs B = tokens // T sequences, so every column does the same number of tokens and a
linear-time op should be flat across T. Peers: torch SDPA (softmax attention, head dim = value dim, its
cuDNN and flash backends) and flash-linear-attention's ReBased/Based kernels, when fla is installed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rebased.bench.ops import DTYPES
from rebased.feature_maps import make_feature_map
from rebased.ops import DEFAULT_EPS, linear_attention


@dataclass(frozen=True)
class SuiteConfig:
    feature_map: str = "rebased"
    tokens: int = 65536
    heads: int = 16
    head_dim: int = 16
    value_dim: int = 64
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
    entries: tuple[str, ...] = ("chunk/triton", "parallel/triton", "chunk/torch", "parallel/torch")
    peers: bool = True
    dtype: str = "bfloat16"
    decode_contexts: tuple[int, ...] = (1024, 4096, 16384, 65536)
    decode_batches: tuple[int, ...] = (1, 64)
    max_scores_bytes: float = 10e9  # skip a quadratic op whose fp32 scores alone would exceed this
    seed: int = 0

    def __post_init__(self):
        """Fail on a bad setting before the suite compiles or times anything."""
        from rebased.bench.ops import check_polynomial
        from rebased.ops import MODES
        from rebased.ops.common import check_choice

        for name in ("tokens", "heads", "head_dim", "value_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lengths or any(length < 1 for length in self.lengths):
            raise ValueError(f"lengths must be one or more integers >= 1, got {self.lengths}")
        if max(self.lengths) > self.tokens:
            raise ValueError(f"lengths up to {max(self.lengths)} need at least that many tokens per call, "
                             f"got tokens={self.tokens} (batch = tokens // T)")  # fmt: skip
        for entry in self.entries:
            mode, _, backend = entry.partition("/")
            if entry != "chunk_states/triton" and (mode not in MODES or backend not in ("torch", "triton")):
                raise ValueError(f"entry {entry!r}: expected MODE/BACKEND with MODE one of {', '.join(MODES)} and "
                                 "BACKEND torch or triton, or chunk_states/triton")  # fmt: skip
        check_choice("dtype", self.dtype, DTYPES)
        check_polynomial(self.feature_map, self.head_dim, self.heads)


@dataclass
class SuiteRow:
    name: str
    length: int
    forward_ms: float
    backward_ms: float  # forward + backward
    forward_mib: float  # peak memory above the inputs
    backward_mib: float
    note: str = ""


def _gpu_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def _peak_mib(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _suite_entries(config: SuiteConfig, kernel, normalize: bool) -> dict[str, tuple[Callable, bool]]:
    """name -> (fn(q, k, v) -> o, is_quadratic). q, k are [B, T, H, D]; SDPA gets D = V, as in a softmax layer."""
    entries: dict[str, tuple[Callable, bool]] = {}
    for entry in config.entries:
        if entry == "chunk_states/triton":  # chunk/triton's kernels called directly, without linear_attention
            from rebased.ops.triton.chunk_states import chunk_states_linear_attention

            options = dict(initial_state=None, output_final_state=False, eps=DEFAULT_EPS, chunk_size=64)
            run = functools.partial(chunk_states_linear_attention, kernel=kernel, normalize=normalize, **options)
            entries[entry] = (functools.partial(_output_only, run), False)
            continue
        mode, backend = entry.split("/")
        run = functools.partial(linear_attention, mode=mode, backend=backend, kernel=kernel, normalize=normalize)
        entries[entry] = (functools.partial(_output_only, run), entry == "parallel/torch")  # T x T in memory
    if not config.peers:
        return entries
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def run(q, k, v):  # [B, T, H, V] -> [B, H, T, V] for SDPA; q, k widened to V like a softmax layer's
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

        return run

    entries["sdpa/cudnn"] = (sdpa(SDPBackend.CUDNN_ATTENTION), True)
    entries["sdpa/flash"] = (sdpa(SDPBackend.FLASH_ATTENTION), True)
    try:
        from fla.ops.based import fused_chunk_based, parallel_based
        from fla.ops.rebased import parallel_rebased
    except ImportError:
        return entries
    entries["fla/parallel_rebased"] = (parallel_rebased, True)
    entries["fla/parallel_based"] = (parallel_based, True)
    entries["fla/fused_chunk_based"] = (fused_chunk_based, False)
    return entries


def _output_only(run: Callable, q, k, v):
    return run(q, k, v)[0]


def _suite_inputs(config: SuiteConfig, name: str, length: int, fmap, generator: torch.Generator):
    batch, dtype = config.tokens // length, DTYPES[config.dtype]
    qk_dim = config.value_dim if name.startswith("sdpa") else config.head_dim
    shape = (batch, length, config.heads)
    q, k = (torch.randn(*shape, qk_dim, generator=generator) for _ in range(2))
    v = torch.randn(*shape, config.value_dim, generator=generator)
    if name.startswith("sdpa"):
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    elif not name.startswith("fla"):
        q, k = fmap.prepare(q, k)  # the feature map's own LayerNorm is not part of the timed op
    return [x.to("cuda", dtype).contiguous().requires_grad_(True) for x in (q, k, v)]


def time_suite(
    config: SuiteConfig,
    progress: Callable[[str], None] = lambda _: None,
    on_row: Callable[[list[SuiteRow]], None] = lambda _: None,
) -> list[SuiteRow]:
    """Forward and forward+backward median times and peak memory for every entry at every length; on_row gets
    the rows so far after each one (so a caller can save them before a long suite is cut short)."""
    fmap = make_feature_map(config.feature_map, config.head_dim, config.heads)
    generator = torch.Generator().manual_seed(config.seed)
    rows = []
    for name, (fn, quadratic) in _suite_entries(config, fmap.kernel, fmap.normalize).items():
        for length in config.lengths:
            scores = 4.0 * config.tokens * length * config.heads
            if quadratic and not name.startswith(("sdpa", "fla")) and scores > config.max_scores_bytes:
                rows.append(SuiteRow(name, length, math.nan, math.nan, math.nan, math.nan, "skipped: T^2 memory"))
            else:
                rows.append(_time_entry(name, fn, _suite_inputs(config, name, length, fmap, generator), length))
                progress(f"{name} T={length}: {rows[-1]}")
                torch.cuda.empty_cache()
            on_row(rows)
    return rows


def _time_entry(name: str, fn: Callable, inputs: list, length: int) -> SuiteRow:
    def forward():
        with torch.no_grad():
            return fn(*inputs)

    def both():
        return torch.autograd.grad(fn(*inputs), inputs, grad)

    try:
        grad = torch.randn_like(forward())  # a peer that refuses the shape refuses it here
        row = SuiteRow(name, length, _gpu_ms(forward), _gpu_ms(both), _peak_mib(forward), _peak_mib(both))
    except Exception as error:  # noqa: BLE001  (a peer that cannot run this shape is a row that says so)
        torch.cuda.empty_cache()
        return SuiteRow(name, length, math.nan, math.nan, math.nan, math.nan, f"failed: {str(error)[:60]}")
    return row


@dataclass
class DecodeRow:
    name: str
    batch: int
    context: int  # tokens already in the cache / state
    step_us: float
    note: str = ""


def time_decode(config: SuiteConfig) -> list[DecodeRow]:
    """One decoding step of one layer (all heads), replayed from a CUDA graph so launch gaps stay out.

    The linear-attention state has the same size at every context, so its step is timed once per batch;
    the SDPA step reads a KV cache that grows with the context."""
    import triton.testing

    from rebased.ops import linear_attention_step
    from rebased.ops.triton import step_

    fmap = make_feature_map(config.feature_map, config.head_dim, config.heads)
    kernel, dtype, heads = fmap.kernel, DTYPES[config.dtype], config.heads
    feat = kernel.feature_dim(config.head_dim)
    bench = lambda fn: 1e3 * triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")  # noqa: E731
    rows = []
    for batch in config.decode_batches:
        q, k = (torch.randn(batch, heads, config.head_dim, device="cuda", dtype=dtype) for _ in range(2))
        v = torch.randn(batch, heads, config.value_dim, device="cuda", dtype=dtype)
        kv = torch.randn(batch, heads, feat, config.value_dim, device="cuda").abs()
        state = (kv, torch.rand(batch, heads, feat, device="cuda"))
        note = "state size independent of context"
        ours = functools.partial(step_, q, k, v, state, kernel=kernel)
        rows.append(DecodeRow("step/triton (in place)", batch, 0, bench(ours), note))
        torch_step = functools.partial(linear_attention_step, q, k, v, state, kernel=kernel)
        rows.append(DecodeRow("step/torch", batch, 0, bench(torch_step), note))
        for context in config.decode_contexts:
            rows.append(_sdpa_decode_row(batch, heads, context, config.value_dim, dtype, bench))
    return rows


def _sdpa_decode_row(batch, heads, context, dim, dtype, bench) -> DecodeRow:
    q = torch.randn(batch, heads, 1, dim, device="cuda", dtype=dtype)
    try:
        cache = torch.randn(2, batch, heads, context, dim, device="cuda", dtype=dtype)
        run = lambda: torch.nn.functional.scaled_dot_product_attention(q, cache[0], cache[1])  # noqa: E731
        row = DecodeRow("sdpa on KV cache", batch, context, bench(run))
    except (torch.OutOfMemoryError, RuntimeError) as error:
        row = DecodeRow("sdpa on KV cache", batch, context, math.nan, f"failed: {str(error)[:60]}")
    torch.cuda.empty_cache()
    return row
