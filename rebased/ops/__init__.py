"""Linear-attention ops: one contract, several (mode, backend) implementations.

    o_t = sum_{s<=t} sim(q_t, k_s) v_s / (sum_{s<=t} sim(q_t, k_s) + eps)

`linear_attention` takes q, k either feature-mapped (kernel=None; sim is their dot product) or projected,
with a Polynomial kernel (sim = p(q.k), computed by the kernel trick where a mode can). Layout
[B, T, H, *] everywhere; the state is (kv [B, H, F, V], k_sum [B, H, F]) in feature space, so a state from
any mode continues in any other.

Modes: "parallel" (masked quadratic), "chunk" (linear in T), "recurrent" (a scan), "auto" (parallel up
to PARALLEL_MAX_LENGTH, chunk beyond). Backends: "torch" (any device), "triton" (CUDA; fused kernels,
imported only when asked for), "auto" (triton for CUDA tensors where it implements the pair and covers the
inputs, on a Triton version the GPU tests passed on; else torch). Explicit backends never fall back.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

from torch import Tensor

from rebased.ops.chunk import chunk_linear_attention
from rebased.ops.common import (
    DEFAULT_EPS,
    LinearAttentionState,
    check_choice,
    check_tensor,
    compute_dtype,
    feature_dim,
    validate_inputs,
    validate_state,
)
from rebased.ops.conv import short_conv
from rebased.ops.embedding import Embedding
from rebased.ops.kernels import Polynomial
from rebased.ops.norm import LayerNorm, layer_norm
from rebased.ops.parallel import parallel_linear_attention
from rebased.ops.recurrent import recurrent_linear_attention, step_unchecked, zero_state
from rebased.ops.reference import linear_attention_reference
from rebased.ops.rwkv import wkv
from rebased.ops.scan import selective_scan
from rebased.ops.varlen import validate_packed, varlen_linear_attention

log = logging.getLogger(__name__)

MODES = ("parallel", "chunk", "recurrent")  # the concrete forms; mode="auto" resolves to one of them
BACKENDS = ("torch", "triton", "auto")
# mode="auto": the parallel form up to this length, the chunk form beyond: the measured fwd+bwd crossovers.
# torch on the CPU: parallel 2-6x faster at T 128-256, even at 512 (`rebased bench --batch 8 --heads 12
# --value-dim 5`). triton on the H200 (benchmarks/results/h200/bench_sums256_3d.md: bf16, q/k 16, v 64): the
# chunk kernels take about 6.4 ms at every T from 1k to 64k, the parallel ones grow with T; they tie at T 4096
# (6.38 ms), parallel faster below, chunk beyond.
PARALLEL_MAX_LENGTH = {"torch": 256, "triton": 4096}

# (mode, backend) -> implementation; every entry has the same keyword signature.
IMPLEMENTATIONS: dict[tuple[str, str], Callable] = {
    ("parallel", "torch"): parallel_linear_attention,
    ("chunk", "torch"): chunk_linear_attention,
    ("recurrent", "torch"): recurrent_linear_attention,
}
# Pairs that take cu_seqlens themselves (the rest run one call per sequence, rebased.ops.varlen); same
# keywords as IMPLEMENTATIONS, with cu_seqlens after v.
VARLEN_IMPLEMENTATIONS: dict[tuple[str, str], Callable] = {}
_TRITON_MODULE = "rebased.ops.triton"  # registers its own pairs into IMPLEMENTATIONS when imported


def _load_triton() -> bool:
    """Import the Triton backend on first use; False when triton (or the backend) is not installed."""
    try:
        importlib.import_module(_TRITON_MODULE)
    except ImportError:
        return False
    return True


def _triton_versions():
    return importlib.import_module(f"{_TRITON_MODULE}.versions")


def auto_picks_triton(x: Tensor) -> bool:
    """backend="auto" (here and, through pick_backend, in the ops with a Triton form): the Triton kernels for CUDA
    tensors when triton is installed at a version the GPU tests passed on (rebased.ops.triton.versions); on
    another version torch, with one warning."""
    return x.is_cuda and _load_triton() and _triton_versions().check_trusted("backend='auto' runs torch")


def pick_backend(backend: str, x: Tensor, what: str, *, enabled: bool = True,
                 fits: Callable[[], bool] = lambda: True) -> str:  # fmt: skip
    """The form a call of an op with a torch and a Triton form runs, "torch" or "triton" (after check_choice):
    "auto" takes triton where the op's own switch allows it (enabled), auto_picks_triton(x) does, and then the
    kernels take the call (fits, asked last: it may import them); an explicit "triton" passes require_triton."""
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        return "triton" if enabled and auto_picks_triton(x) and fits() else "torch"
    if backend == "triton":
        require_triton(f"{what}(backend='triton')", x)
    return backend


def require_triton(what: str, x: Tensor) -> None:
    """An explicit backend="triton": NotImplementedError without the package, or for tensors off CUDA outside
    TRITON_INTERPRET=1 (where the kernels cannot run); for CUDA tensors (where the compiled kernels run) one
    warning on a Triton version the GPU tests did not pass on: they run anyway."""
    if not _load_triton():
        raise NotImplementedError(f"{what} needs the triton package, which is not installed")
    if x.is_cuda:
        _triton_versions().check_trusted("backend='triton' runs the kernels anyway")
    elif not importlib.import_module(f"{_TRITON_MODULE}.launch").interpreting():
        raise NotImplementedError(f"{what} needs CUDA tensors (or TRITON_INTERPRET=1), got device {x.device}")


def resolve_backend(mode: str, backend: str, q: Tensor) -> Callable:
    """The implementation for (mode, backend), or NotImplementedError naming the pair."""
    if backend == "auto":
        if auto_picks_triton(q) and (mode, "triton") in IMPLEMENTATIONS:
            return IMPLEMENTATIONS[(mode, "triton")]
        return IMPLEMENTATIONS[(mode, "torch")]
    if backend == "triton":
        require_triton(f"(mode={mode!r}, backend='triton')", q)
    if (mode, backend) not in IMPLEMENTATIONS:
        raise NotImplementedError(f"(mode={mode!r}, backend={backend!r}) is not implemented")
    return IMPLEMENTATIONS[(mode, backend)]


def pick_mode(q: Tensor, backend: str, initial_state: LinearAttentionState | None, length: int | None = None) -> str:
    """mode="auto": parallel up to PARALLEL_MAX_LENGTH for the backend that will run, else chunk. The fused
    parallel kernel takes no initial state, so a call with one goes to the chunk kernels instead.
    length: the sequence length to decide by (default q's T; the longest sequence of a packed batch)."""
    fused = _runs_fused(q, backend)
    if fused and initial_state is not None:
        return "chunk"
    length = q.shape[1] if length is None else length
    return "parallel" if length <= PARALLEL_MAX_LENGTH["triton" if fused else "torch"] else "chunk"


def _runs_fused(q: Tensor, backend: str) -> bool:
    """Whether the compiled Triton kernels run for q under this backend."""
    return auto_picks_triton(q) if backend == "auto" else backend == "triton" and q.is_cuda and _load_triton()


def prefer_fused_chunk(mode: str, q: Tensor, v: Tensor, backend: str, sequences: int, length: int) -> str:
    """mode="auto", after pick_mode: chunk rather than parallel where the Triton chunk pair runs its fused kernels
    for small heads and beats the parallel kernel (rebased.ops.triton.chunk_dispatch.prefers_chunk_mode)."""
    if mode != "parallel" or not _runs_fused(q, backend):
        return mode
    dispatch = importlib.import_module(f"{_TRITON_MODULE}.chunk_dispatch")
    return "chunk" if dispatch.prefers_chunk_mode(q, v, sequences, length) else mode


def linear_attention(
    q: Tensor,  # [B, T, H, D]
    k: Tensor,  # [B, T, H, D]
    v: Tensor,  # [B, T, H, V]
    *,
    mode: str = "chunk",
    backend: str = "auto",
    kernel: Polynomial | None = None,
    initial_state: LinearAttentionState | tuple[Tensor, Tensor] | None = None,
    output_final_state: bool = False,
    normalize: bool = True,
    eps: float = DEFAULT_EPS,
    chunk_size: int = 64,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, LinearAttentionState | None]:
    """Causal linear attention. Returns o [B, T, H, V] in v's dtype and, if asked, the final state (fp32).

    kernel=None: q, k are feature maps phi(q), phi(k) of dimension F. kernel=Polynomial: q, k are the
    projected inputs of dimension D and sim = kernel.similarity(q . k). cu_seqlens (int [N + 1]): N
    sequences packed along T in a batch of one, states with N rows (rebased.ops.varlen).
    """
    check_choice("mode", mode, (*MODES, "auto"))
    check_choice("backend", backend, BACKENDS)
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if cu_seqlens is not None:
        return _packed(
            q, k, v, cu_seqlens, mode=mode, backend=backend, kernel=kernel, initial_state=initial_state,
            output_final_state=output_final_state, normalize=normalize, eps=eps, chunk_size=chunk_size,
        )  # fmt: skip
    state = validate_inputs(q, k, v, initial_state, kernel, eps)
    requested_mode = mode
    if mode == "auto":
        mode = prefer_fused_chunk(pick_mode(q, backend, state), q, v, backend, q.shape[0], q.shape[1])
    options = dict(
        kernel=kernel, initial_state=state, output_final_state=output_final_state, normalize=normalize, eps=eps,
        chunk_size=chunk_size,
    )  # fmt: skip
    implementation = resolve_backend(mode, backend, q)
    if backend == "auto" and implementation is not IMPLEMENTATIONS[(mode, "torch")]:
        try:  # a fused kernel refuses inputs it does not cover (dtype, head dim) before doing any work
            return implementation(q, k, v, **options)
        except NotImplementedError as refusal:
            log.debug("backend auto: %s; using torch", refusal)
            if requested_mode == "auto":  # torch's own crossover: its parallel form holds T x T scores
                mode = pick_mode(q, "torch", state)
            return IMPLEMENTATIONS[(mode, "torch")](q, k, v, **options)
    return implementation(q, k, v, **options)


def _packed(q, k, v, cu_seqlens, *, mode, backend, initial_state, **options) -> tuple:
    """cu_seqlens: the pair's own packed kernel where there is one (VARLEN_IMPLEMENTATIONS), else one call per
    sequence. mode="auto" decides by the longest sequence."""
    bounds, state = validate_packed(q, k, v, cu_seqlens, initial_state, options["kernel"], options["eps"])
    if mode == "auto":
        longest = max(b - a for a, b in zip(bounds, bounds[1:]))
        mode = prefer_fused_chunk(pick_mode(q, backend, state, length=longest), q, v, backend, len(bounds) - 1, longest)
    if backend == "triton":
        require_triton(f"(mode={mode!r}, backend='triton')", q)
    wants_triton = backend == "triton" or (backend == "auto" and auto_picks_triton(q))
    native = VARLEN_IMPLEMENTATIONS.get((mode, "triton")) if wants_triton else None
    if native is not None:
        try:
            return native(q, k, v, cu_seqlens, initial_state=state, **options)
        except NotImplementedError as refusal:
            if backend == "triton":
                raise
            log.debug("backend auto: %s; one call per sequence", refusal)
    return varlen_linear_attention(linear_attention, q, k, v, bounds, state, mode=mode, backend=backend, **options)


def linear_attention_step(
    q: Tensor,  # [B, H, D]
    k: Tensor,  # [B, H, D]
    v: Tensor,  # [B, H, V]
    state: LinearAttentionState | tuple[Tensor, Tensor] | None = None,
    *,
    kernel: Polynomial | None = None,
    normalize: bool = True,
    eps: float = DEFAULT_EPS,
    backend: str = "torch",
) -> tuple[Tensor, LinearAttentionState]:
    """One decoding step: o [B, H, V] (v's dtype) and the new state; state=None starts from zero.

    backend="triton" (inference only) adds the token to the given state in place, which must be float32
    and contiguous, and returns that same state.
    """
    check_choice("backend", backend, ("torch", "triton"))
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, 3)
    if q.shape != k.shape or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"step needs q, k [B, H, D] and v [B, H, V], got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    batch, heads, head_dim = q.shape
    feat = feature_dim(head_dim, kernel)
    dtype = compute_dtype(q.dtype)
    if state is None:
        state = zero_state(batch, heads, feat, v.shape[-1], dtype=dtype, device=q.device)
    else:
        state = validate_state(state, batch, heads, feat, v.shape[-1])
        if backend == "torch":  # (the triton step adds in place, so it must get the caller's own tensors)
            state = LinearAttentionState(state.kv.to(dtype), state.k_sum.to(dtype))
    if backend == "triton":
        require_triton("linear_attention_step(backend='triton')", q)
        step_ = importlib.import_module(_TRITON_MODULE).step_
        return step_(q, k, v, state, kernel=kernel, normalize=normalize, eps=eps), state
    o, new_state = step_unchecked(q, k, v, state, kernel, normalize, eps)
    return o.to(v.dtype), new_state


__all__ = [
    "BACKENDS",
    "DEFAULT_EPS",
    "IMPLEMENTATIONS",
    "MODES",
    "PARALLEL_MAX_LENGTH",
    "VARLEN_IMPLEMENTATIONS",
    "Embedding",
    "LayerNorm",
    "LinearAttentionState",
    "Polynomial",
    "layer_norm",
    "linear_attention",
    "linear_attention_reference",
    "linear_attention_step",
    "pick_mode",
    "selective_scan",
    "short_conv",
    "wkv",
]
