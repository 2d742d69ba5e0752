"""Mamba's selective scan over [B, T, Din]: torch (a chunked form, the reference), or a Triton kernel on CUDA.

    h_t = exp(dt_t A) * h_{t-1} + (dt_t x_t) B_t^T,   y_t = h_t C_t      (h [B, Din, N], A [Din, N] < 0)

The torch form loops over chunks of Cs steps, not over steps: inside a chunk, with the cumulative log-decay
L_t = sum_{s<=t} dt_s A (<= 0 and decreasing),
    h_t = exp(L_t) h_0 + sum_{s<=t} exp(L_t - L_s) (dt_s x_s) B_s^T,
and every exponent is <= 0, so nothing overflows; entries with s > t are set to -inf before exp. It builds a
[B, Cs, Cs, Din, N] tensor a chunk, which is what rebased/ops/triton/selective_scan.py avoids.

backend "torch" is that form, in h's dtype (fp32, or fp64 for fp64 inputs); "triton" the kernel (fp32; CUDA, or
CPU tensors under TRITON_INTERPRET=1); "auto" the kernel for CUDA tensors of at most 32 bits when
SCAN_TRITON_ON_GPU is set and triton is installed at a version the GPU tests passed on, else torch. Explicit
backends never fall back.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

_KERNEL_MODULE = "rebased.ops.triton.selective_scan"
# Whether "auto" may take the kernel on a GPU: its GPU tests pass on an H200 (benchmarks/results/h200_mqar/
# step_tests_f49fce1.log); off until a Mamba MQAR step has timed it (benchmarks/mqar_cost_gpu.py --variants
# graph-committed,graph-committed-triton-scan --cells mamba:64:2048).
SCAN_TRITON_ON_GPU = False


def _scan_chunk(x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """One chunk: x, dt [B, Cs, Din]; a [Din, N]; b, c [B, Cs, N]; h [B, Din, N] -> y [B, Cs, Din], h."""
    log_decay = (dt.unsqueeze(-1) * a).cumsum(1)  # [B, Cs, Din, N]: L_t
    size = x.shape[1]
    causal = torch.ones(size, size, dtype=torch.bool, device=x.device).tril().view(1, size, size, 1, 1)
    gaps = log_decay.unsqueeze(2) - log_decay.unsqueeze(1)  # [B, Cs(t), Cs(s), Din, N]: L_t - L_s
    decay = torch.where(causal, gaps, float("-inf")).exp()
    inputs = dt * x  # [B, Cs, Din]
    weights = torch.einsum("btn,btsdn,bsn->btsd", c, decay, b)
    y = torch.einsum("btsd,bsd->btd", weights, inputs) + torch.einsum("btn,btdn,bdn->btd", c, log_decay.exp(), h)
    to_end = (log_decay[:, -1:] - log_decay).exp()  # [B, Cs, Din, N]: exp(L_end - L_s)
    h = log_decay[:, -1].exp() * h + torch.einsum("bsdn,bsn,bsd->bdn", to_end, b, inputs)
    return y, h


def _torch_scan(x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor, h: Tensor, chunk: int):
    """x, dt [B, T, Din]; b, c [B, T, N]; h [B, Din, N] -> y [B, T, Din], final h; in h's dtype (fp32 or fp64)."""
    x, dt, a, b, c = (t.to(h.dtype) for t in (x, dt, a, b, c))
    outputs = []
    for start in range(0, x.shape[1], chunk):
        part = slice(start, start + chunk)
        y, h = _scan_chunk(x[:, part], dt[:, part], a, b[:, part], c[:, part], h)
        outputs.append(y)
    return torch.cat(outputs, dim=1), h


def selective_scan(x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor, h: Tensor, *, chunk: int,
                   backend: str = "auto") -> tuple[Tensor, Tensor]:  # fmt: skip
    """x, dt [B, T, Din]; a [Din, N]; b, c [B, T, N]; h [B, Din, N] (the state before) -> y [B, T, Din] and the
    final h, in h's dtype. chunk: the torch form's Cs."""
    from rebased.ops import pick_backend  # (rebased.ops imports this module)

    explicit = backend == "triton"
    backend = pick_backend(backend, x, "selective_scan", enabled=SCAN_TRITON_ON_GPU and h.dtype != torch.float64)
    if explicit and h.dtype == torch.float64:
        raise NotImplementedError("selective_scan(backend='triton') computes in fp32; got a float64 state")
    if backend == "torch":
        return _torch_scan(x, dt, a, b, c, h, chunk)
    return importlib.import_module(_KERNEL_MODULE).selective_scan(x, dt, a, b, c, h)
