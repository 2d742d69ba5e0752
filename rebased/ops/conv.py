"""The short causal depthwise convolution of the BaseConv, Hyena and Mamba mixers, over [B, T, C]: torch, or
Triton kernels on CUDA.

    y[b, t, c] = bias[c] + sum_k W[c, 0, k] x[b, t - (K - 1) + k, c]       (Conv1d's weight [C, 1, K])

backend "torch" is nn.Conv1d's function on the transposed input, cut to T outputs (the reference); "triton"
keeps [B, T, C] throughout and writes y in the dtype the next op takes (autocast's dtype under autocast, else
x's), with fp32 math and weights (rebased/ops/triton/short_conv.py says why); "auto" takes triton for CUDA
tensors when SHORT_CONV_TRITON_ON_GPU is set and triton is installed at a version the GPU tests passed on,
else torch. Explicit backends never fall back.
"""

from __future__ import annotations

import importlib

import torch.nn.functional as F
from torch import Tensor

from rebased.ops.common import autocast_output_dtype

CONV_BACKENDS = ("torch", "triton", "auto")
_KERNEL_MODULE = "rebased.ops.triton.short_conv"
# Whether "auto" may take the kernels on a GPU. On: their GPU tests pass on an H200, and they cut the graphed MQAR
# step at batch 512 (benchmarks/results/h200_mqar/mqar_step_c045f52.log): ReBased d_model 64 L 2048 28.6 -> 26.5 ms,
# d_model 128 65.6 -> 56.3, Based d_model 64 41.1 -> 31.8 (torch's Conv1d needs [B, C, T] and copies both ways).
SHORT_CONV_TRITON_ON_GPU = True


def short_conv(x: Tensor, weight: Tensor, bias: Tensor | None, *, backend: str = "auto") -> Tensor:
    """x [B, T, C], weight [C, 1, K], bias [C] or None -> y [B, T, C]: causal (y at t sees x up to t)."""
    from rebased.ops import pick_backend  # (rebased.ops imports this module)

    fits = lambda: weight.shape[-1] <= _kernels().MAX_TAPS  # noqa: E731
    if pick_backend(backend, x, "short_conv", enabled=SHORT_CONV_TRITON_ON_GPU, fits=fits) == "torch":
        taps, steps = weight.shape[-1], x.shape[1]
        y = F.conv1d(x.transpose(1, 2), weight, bias, padding=taps - 1, groups=x.shape[2])
        return y[..., :steps].transpose(1, 2)
    return _kernels().short_conv(x, weight, bias, autocast_output_dtype(x))


def _kernels():
    return importlib.import_module(_KERNEL_MODULE)
