"""From a global batch of example indices to what a training step consumes, on the training device.

    batches.load(indices, parts) -> GlobalBatch(parts=[MicroBatch(inputs, positions, targets), ...], count)

indices: the global batch's example indices [B] (a host tensor); parts: slices of it, this rank's micro-batches.

inputs [n, L] token ids; positions the flat indices b * L + t where the loss is taken (the model's `select`);
targets the labels there; count the labelled positions of the whole global batch (all ranks, all micro-batches),
the divisor that makes micro-batches and ranks add up to one big batch's mean.

HostBatches takes any Examples (windows read from disk, say): each step gathers its rows on the host, finds the
labelled positions there and copies the result from pinned memory without blocking.

LabelTableBatches takes examples held in memory (ExampleTensors) that fit TABLE_MEMORY_SHARE of the device's
memory and moves them there once. Each
example's labelled positions are found once, at the start, and kept as a table [N, K] padded to the most labels
K any example has (padding: position 0 with target IGNORE_INDEX, which the loss skips). A step is then a few
gathers on the device: no host work that grows with the batch, and every step has the same shapes (n * K
positions), which is what capturing the step as a CUDA graph needs (rebased.train.graphed).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import Tensor

from rebased.train.examples import Examples, ExampleTensors
from rebased.train.labels import IGNORE_INDEX

TABLE_ROWS_PER_PASS = 8192  # label tables are built this many examples at a time: bounded temporaries
# The most of the device's memory that examples moved there with their label table may take (token ids at 4
# bytes, each label at 8: its position and target, int32); larger sets of examples come through the host.
TABLE_MEMORY_SHARE = 0.25


class MicroBatch(NamedTuple):
    inputs: Tensor  # [n, L] token ids
    positions: Tensor  # [M] flat indices b * L + t, row-major
    targets: Tensor  # [M] int64 labels (IGNORE_INDEX at padding)


class GlobalBatch(NamedTuple):
    parts: list[MicroBatch]  # this rank's micro-batches
    count: int | Tensor  # labelled positions in the whole global batch, at least 1


def labelled_positions(labels: Tensor) -> tuple[Tensor, Tensor]:
    """The flat indices b * T + t of the labelled positions of labels [B, T], and their labels, row-major."""
    positions = (labels != IGNORE_INDEX).flatten().nonzero().squeeze(1)
    return positions, labels.flatten()[positions]


def label_table(labels: Tensor) -> tuple[Tensor, Tensor]:
    """labels [N, L] -> (positions [N, K], targets [N, K]), int32: each example's labelled positions t in
    increasing order and their labels, padded to K = the most labels of any example with position 0 and
    IGNORE_INDEX."""
    counts = (labels != IGNORE_INDEX).sum(1)
    width = int(counts.max()) if len(labels) else 0
    positions = torch.zeros(len(labels), width, dtype=torch.int32)
    targets = torch.full((len(labels), width), IGNORE_INDEX, dtype=torch.int32)
    for start in range(0, len(labels), TABLE_ROWS_PER_PASS):
        block = labels[start : start + TABLE_ROWS_PER_PASS]
        unlabelled = (block == IGNORE_INDEX).to(torch.uint8)
        # A stable sort of 0 (labelled) before 1 (not) lists each row's labelled t first, in increasing order.
        order = torch.sort(unlabelled, dim=1, stable=True).indices[:, :width]
        real = torch.arange(width) < counts[start : start + len(block), None]
        positions[start : start + len(block)] = torch.where(real, order, 0)
        targets[start : start + len(block)] = torch.where(real, block.gather(1, order), IGNORE_INDEX)
    return positions, targets


def to_device(tensors: tuple[Tensor, ...], device: torch.device) -> tuple[Tensor, ...]:
    """The tensors on `device`. Host tensors go to a GPU from pinned memory, without making the host wait for
    the work queued before them (a copy from pageable memory does)."""
    if device.type != "cuda":
        return tuple(t.to(device) for t in tensors)
    return tuple(
        t.pin_memory().to(device, non_blocking=True) if t.device.type == "cpu" else t.to(device) for t in tensors
    )


class HostBatches:
    """Any Examples: each step's rows gathered and their labels found on the host."""

    fixed_shapes = False  # the number of labelled positions varies from batch to batch

    def __init__(self, examples: Examples, device: torch.device):
        self.examples, self.device = examples, device

    def load(self, indices: Tensor, parts: list[slice]) -> GlobalBatch:
        inputs, labels = self.examples[indices]  # the whole global batch, on the host
        count = max(1, int((labels != IGNORE_INDEX).sum()))
        micro = []
        for rows in parts:
            positions, targets = labelled_positions(labels[rows])
            micro.append(MicroBatch(*to_device((inputs[rows], positions, targets), self.device)))
        return GlobalBatch(micro, count)


class LabelTableBatches:
    """ExampleTensors on the device, with a label table (module docstring): a step is a few gathers there."""

    fixed_shapes = True

    def __init__(self, examples: ExampleTensors, device: torch.device):
        self.device, self.length = device, examples.inputs.shape[1]
        positions, targets = label_table(examples.labels)
        # Token ids as int32 where they fit: half the memory and the gather traffic (embeddings take int32).
        small = len(examples) == 0 or int(examples.inputs.max()) < 2**31
        inputs = examples.inputs.int() if small else examples.inputs
        self.inputs, self.positions, self.targets = (t.to(device) for t in (inputs, positions, targets))
        self.row_starts: dict[int, Tensor] = {}  # micro-batch size -> [n, 1] flat index of each row's first token

    def load(self, indices: Tensor, parts: list[slice]) -> GlobalBatch:
        (rows,) = to_device((indices,), self.device)
        targets = self.targets[rows].long()  # the whole global batch's: its count is the divisor
        count = (targets != IGNORE_INDEX).sum().clamp_min(1)  # on the device: no wait for it
        micro = []
        for part in parts:
            chosen = rows[part]
            positions = (self.positions[chosen].long() + self.starts(len(chosen))).flatten()
            micro.append(MicroBatch(self.inputs[chosen], positions, targets[part].flatten()))
        return GlobalBatch(micro, count)

    def starts(self, rows: int) -> Tensor:
        """b * L for b < rows, made once per micro-batch size rather than at every step."""
        if rows not in self.row_starts:
            self.row_starts[rows] = torch.arange(rows, device=self.device)[:, None] * self.length
        return self.row_starts[rows]


def memory_of(device: torch.device) -> int:
    """Bytes of memory the device has: a GPU's own, or the host's for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def table_bytes(examples: ExampleTensors) -> int:
    """What LabelTableBatches puts on the device for these examples."""
    labels = int((examples.labels != IGNORE_INDEX).sum(1).max()) if len(examples) else 0
    return len(examples) * (4 * examples.inputs.shape[1] + 8 * labels)


def batch_source(examples: Examples, device: torch.device) -> HostBatches | LabelTableBatches:
    """The label table for examples in memory that fit TABLE_MEMORY_SHARE of the device, the host for the rest."""
    if isinstance(examples, ExampleTensors) and table_bytes(examples) <= TABLE_MEMORY_SHARE * memory_of(device):
        return LabelTableBatches(examples, device)
    return HostBatches(examples, device)
