"""What train() learns from: a set of N examples, indexed by a batch of rows.

    examples[rows] -> (inputs [n, L], labels [n, L])   long tensors on the CPU, labels IGNORE_INDEX where unscored

The loop draws each epoch's batches as a permutation of range(N) (seeded by (seed, epoch)), so any object with
__len__ and this __getitem__ trains and resumes exactly: in-memory tensors (ExampleTensors, the MQAR task) or
windows read from token shards on disk (the language-model task).
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class Examples(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, rows: Tensor) -> tuple[Tensor, Tensor]: ...


class ExampleTensors:
    """Examples held in memory as two [N, L] tensors."""

    def __init__(self, inputs: Tensor, labels: Tensor):
        if inputs.dim() != 2 or inputs.shape != labels.shape:
            raise ValueError(f"inputs and labels must be two [N, L] tensors, got {tuple(inputs.shape)}, "
                             f"{tuple(labels.shape)}")  # fmt: skip
        self.inputs, self.labels = inputs.long(), labels.long()

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        return self.inputs[rows], self.labels[rows]
