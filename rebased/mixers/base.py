"""The mixer contract and the causal short convolution several mixers share.

Every mixer maps x [B, T, D] -> y [B, T, D] causally and offers three entry points:

    y = mixer(x)                       # training, parallel / chunked over T
    y, state = mixer.prefill(x)        # the same output, plus the state after the last token
    y_t, state = mixer.step(x_t, state)  # one token x_t [B, D]; state=None starts from scratch

so that prefill(x[:, :t]) followed by steps over x[:, t:] reproduces forward(x). state_elements(T) gives
the per-sequence size of the state after T tokens as (fp32 elements, activation-dtype elements).

Fast decoding (rebased.decode) needs a step that allocates nothing the next step depends on, so that a CUDA
graph can replay it on the same memory:

    state = mixer.static_state(state, capacity)   # prefill's state as fixed-size tensors (room for capacity tokens)
    y_t = mixer.step_static(x_t, state, position)  # the state updated in place; position a 0-dim long tensor

The defaults suit a state of fixed-size tensors: step out of place, then copy the new state over the old.

Short convolution (kernel K, depthwise, causal): y_t = b + sum_{j<K} w_j x_{t-K+1+j}; its state is the
last K - 1 inputs. Shape letters: B batch, T time, D model dim, C channels, K kernel size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rebased.ops.common import check_choice
from rebased.ops.conv import CONV_BACKENDS, short_conv


def copy_state_(target: object, source: object) -> None:
    """Copy a state (tensors in NamedTuples, tuples and lists) into another of the same structure, in place."""
    if isinstance(target, Tensor):
        target.copy_(source)
    elif isinstance(target, (tuple, list)):
        for t, s in zip(target, source, strict=True):
            copy_state_(t, s)
    elif target != source:
        raise ValueError(f"a static state changed a non-tensor part: {target!r} -> {source!r}")


def map_state(fn, state: object) -> object:
    """fn applied to every tensor of a state (tensors in NamedTuples, tuples and lists), the structure kept."""
    if isinstance(state, Tensor):
        return fn(state)
    parts = [map_state(fn, part) for part in state]
    return type(state)(*parts) if hasattr(state, "_fields") else type(state)(parts)


class Mixer(nn.Module):
    """Base class; subclasses implement forward, prefill, step and state_elements."""

    fixed_size_state = True  # False where the decoding state grows with the sequence: no static_state then

    def prefill(self, x: Tensor) -> tuple[Tensor, object]:
        raise NotImplementedError

    def step(self, x: Tensor, state: object) -> tuple[Tensor, object]:
        raise NotImplementedError

    def state_elements(self, seq_len: int) -> tuple[int, int]:
        raise NotImplementedError

    def static_state(self, state: object, capacity: int) -> object:
        """prefill's state as fixed-size tensors with room for `capacity` tokens in all (prompt included)."""
        return state

    def step_static(self, x: Tensor, state: object, position: Tensor) -> Tensor:
        """One token x [B, D] at `position` (a 0-dim long tensor) into a static_state, updated in place."""
        y, new_state = self.step(x, state)
        copy_state_(state, new_state)
        return y


class ShortConv(nn.Module):
    """Depthwise causal Conv1d with bias over [B, T, C] (rebased.ops.short_conv's backends: `backend`); the state
    is the last K - 1 inputs [B, K - 1, C]."""

    def __init__(self, channels: int, kernel_size: int, backend: str = "auto"):
        super().__init__()
        check_choice("backend", backend, CONV_BACKENDS)
        self.kernel_size, self.backend = kernel_size, backend
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, padding=kernel_size - 1)

    def forward(self, x: Tensor) -> Tensor:
        return short_conv(x, self.conv.weight, self.conv.bias, backend=self.backend)

    def tail(self, x: Tensor, state: Tensor | None = None) -> Tensor:
        """The last K - 1 inputs after x (zeros before the start), [B, K - 1, C]."""
        if state is not None:
            x = torch.cat([state, x], dim=1)
        keep = self.kernel_size - 1
        x = F.pad(x, (0, 0, max(0, keep - x.shape[1]), 0))
        return x[:, x.shape[1] - keep :]

    def prefill(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self(x), self.tail(x)

    def step(self, x: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
        """x [B, C] -> y [B, C]; state [B, K - 1, C] (None: zeros)."""
        if state is None:
            state = x.new_zeros(x.shape[0], self.kernel_size - 1, x.shape[1])
        window = torch.cat([state, x.unsqueeze(1)], dim=1)  # [B, K, C]
        weight = self.conv.weight.squeeze(1).t()  # [K, C]
        y = (window * weight).sum(1) + self.conv.bias
        return y, window[:, 1:]
