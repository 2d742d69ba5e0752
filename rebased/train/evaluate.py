"""Evaluation: accuracy at the labelled positions (MQAR), overall and per data slice.

accuracy = (# labelled positions where argmax logits == label) / (# labelled positions); -100 is unlabelled.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rebased.train import labelled_logits, labelled_positions, takes_select


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
    """{"accuracy": overall, "loss": mean cross-entropy, "accuracy/<slice>": ...} over labelled positions."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(len(inputs), dtype=torch.long)
    counted = torch.zeros(len(inputs), dtype=torch.long)
    loss_sum = 0.0
    select = takes_select(model)
    for start in range(0, len(inputs), batch_size):
        x = inputs[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        positions, target = labelled_positions(y)
        logits = labelled_logits(model, x, positions, select).float()
        loss_sum += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        rows = (positions // y.shape[1]).cpu() + start
        correct.index_add_(0, rows, (logits.argmax(-1) == target).long().cpu())
        counted.index_add_(0, rows, torch.ones_like(rows))
    model.train(was_training)
    total = counted.sum().clamp_min(1).item()
    metrics = {"accuracy": correct.sum().item() / total, "loss": loss_sum / total}
    for name, (begin, end) in (slices or {}).items():
        metrics[f"accuracy/{name}"] = correct[begin:end].sum().item() / max(counted[begin:end].sum().item(), 1)
    return metrics
