"""Evaluation: accuracy at the labelled positions (MQAR), overall and per data slice.

accuracy = (# labelled positions where argmax logits == label) / (# labelled positions); -100 is unlabelled.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rebased.train.batches import labelled_positions, to_device
from rebased.train.labels import IGNORE_INDEX
from rebased.train.loop import labelled_logits, takes_select


@torch.no_grad()
def accuracy_by_slice(
    model: nn.Module,
    inputs: Tensor,  # [N, L]
    labels: Tensor,  # [N, L], IGNORE_INDEX where unlabelled
    slices: dict[str, tuple[int, int]] | None = None,  # name -> rows [start, stop)
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """{"accuracy": overall, "loss": mean cross-entropy, "accuracy/<slice>": ...} over labelled positions.
    The labelled positions are found where the labels are; the counts add up on the device, which the host
    waits for once, at the end."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    correct = torch.zeros(len(inputs), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    select = takes_select(model)
    for start in range(0, len(inputs), batch_size):
        y = labels[start : start + batch_size]
        positions, target = labelled_positions(y)
        x, positions, target = to_device((inputs[start : start + batch_size], positions, target), device)
        logits = labelled_logits(model, x, positions, select).float()
        loss_sum += nn.functional.cross_entropy(logits, target, reduction="sum")
        correct.index_add_(0, positions // y.shape[1] + start, (logits.argmax(-1) == target).long())
    model.train(was_training)
    correct, counted = correct.cpu(), (labels != IGNORE_INDEX).sum(1).cpu()
    total = counted.sum().clamp_min(1).item()
    metrics = {"accuracy": correct.sum().item() / total, "loss": loss_sum.item() / total}
    for name, (begin, end) in (slices or {}).items():
        metrics[f"accuracy/{name}"] = correct[begin:end].sum().item() / max(counted[begin:end].sum().item(), 1)
    return metrics
