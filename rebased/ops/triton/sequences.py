"""Where the sequences lie along the token axis, and the per-program tables the kernels find their work in.

A dense batch (B sequences of T tokens) has the memory layout of B packed sequences, so one description
(Sequences) and one table builder (program_table) serve dense and cu_seqlens batches, for the parallel and
the chunk kernels alike: a program reads its row of the table (sequence start, length, block index, ...)
and one launch covers every sequence.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor


@dataclass(frozen=True)
class Sequences:
    """A dense batch (batch sequences of length tokens) or cu_seqlens offsets (an int tensor [N + 1])."""

    batch: int = 0
    length: int = 0
    cu_seqlens: Tensor | None = None

    def bounds(self) -> tuple[Tensor, Tensor]:
        """Each sequence's start and length along the token axis: CPU int64 [N]."""
        if self.cu_seqlens is None:
            return torch.arange(self.batch) * self.length, torch.full((self.batch,), self.length)
        cu = self.cu_seqlens.to(device="cpu", dtype=torch.int64)  # (the tables are built on the host)
        return cu[:-1], cu[1:] - cu[:-1]


def program_table(starts: Tensor, lengths: Tensor, block: int, *, first_slots: Tensor | None = None,
                  longest_first: bool | None = None) -> Tensor:  # fmt: skip
    """One row per block of `block` tokens of each sequence, CPU int32: (sequence start, sequence length, block
    index), and the sequence's first state slot when first_slots [N] is given. Sequence by sequence; with
    longest_first, ordered (stably) by block index, descending (query block m walks m + 1 key blocks: the long
    walks start first and the tail is short) or ascending (key blocks walk to the end)."""
    per_sequence = (lengths + block - 1) // block
    sequence = torch.repeat_interleave(torch.arange(len(per_sequence)), per_sequence)
    index = torch.arange(len(sequence)) - (per_sequence.cumsum(0) - per_sequence)[sequence]
    columns = [starts[sequence], lengths[sequence], index]
    if first_slots is not None:
        columns.append(first_slots[sequence])
    table = torch.stack(columns, 1)
    if longest_first is not None:
        table = table[torch.argsort(index, descending=longest_first, stable=True)]
    return table.to(torch.int32)


Built = TypeVar("Built")


def cached_when_dense(build: Callable[..., Built]) -> Callable[..., Built]:
    """build(sequences, *args), remembered per dense shape and args: a training step must not wait for the GPU
    to rebuild the same tables. A cu_seqlens batch is built every call (its offsets are data)."""
    cached = functools.lru_cache(maxsize=64)(build)

    @functools.wraps(build)
    def tables(sequences: Sequences, *args):
        return cached(sequences, *args) if sequences.cu_seqlens is None else build(sequences, *args)

    return tables
