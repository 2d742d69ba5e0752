"""How close a score matrix is to what MQAR asks for: ground truth, IoU, score mass, entropy, accuracy.

Ground truth. An MQAR example (rebased.tasks.mqar.data) holds keys at positions 0, 2, .., 2N - 2 and their
values at 1, 3, .., 2N - 1; a query position p (labelled) repeats key j, and the model must output v_j there.
The position it must read is, by default, the VALUE token 2j + 1 (target="value"): that is the token whose
embedding carries v_j, and with the first layer's short convolution passing the previous token forward (the
paper's set-up) it also carries k_j, so a retrieving layer matches the query there. target="key" takes the
key token 2j, target="pair" both.

IoU. Each example's score matrix is cropped to its query rows and the key-value columns 0 .. 2N - 1 (as the
paper crops it), each row made binary by a rule, and compared with the one-hot ground-truth rows:
IoU = |pred & truth| / |pred | truth| over the whole cropped matrix, then averaged over examples. The paper
does not say how it binarises, so the rule is explicit: top1 (default: the largest score), topk:K, or
threshold:X (scores >= X). Under top1 with one target per query, q queries of which h are right give
h / (2q - h).

Threshold-free companions, per query row of the full (uncropped) matrix: mass on the ground-truth
positions, mass elsewhere (irrelevant tokens), and the entropy of the row normalised to sum 1 (nats).

Shape letters: B examples, H heads, T time, Q queries per example (= N pairs), C key-value columns (2N).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

TARGETS = ("value", "key", "pair")


@dataclass(frozen=True)
class BinarisationRule:
    """How a row of scores becomes a set of positions: kind "top1", "topk" (k) or "threshold" (threshold)."""

    kind: str = "top1"
    k: int = 1
    threshold: float = 0.0

    def __str__(self) -> str:
        return {"top1": "top1", "topk": f"topk:{self.k}", "threshold": f"threshold:{self.threshold:g}"}[self.kind]


def parse_rule(text: str) -> BinarisationRule:
    """'top1', 'topk:K' (K >= 1) or 'threshold:X' (a number) -> the rule; ValueError otherwise."""
    kind, _, argument = text.partition(":")
    try:
        if kind == "top1" and not argument:
            return BinarisationRule()
        if kind == "topk" and int(argument) >= 1:
            return BinarisationRule("topk", k=int(argument))
        if kind == "threshold" and float(argument) == float(argument):  # not NaN
            return BinarisationRule("threshold", threshold=float(argument))
    except ValueError:
        pass
    raise ValueError(f"binarisation rule {text!r}: expected top1, topk:K (an integer >= 1) or threshold:X (a number)")


def binarise(rows: Tensor, rule: BinarisationRule) -> Tensor:
    """rows [..., C] of scores -> boolean [..., C] of the positions the rule keeps."""
    if rule.kind == "threshold":
        return rows >= rule.threshold
    k = 1 if rule.kind == "top1" else min(rule.k, rows.shape[-1])
    keep = torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
    return keep.scatter(-1, rows.topk(k, dim=-1).indices, True)


@dataclass(frozen=True)
class GroundTruth:
    query_positions: Tensor  # [B, Q] long: the labelled positions
    targets: Tensor  # [B, Q, C] bool: the key-value positions each query must read
    num_kv_pairs: int


def mqar_ground_truth(inputs: Tensor, labels: Tensor, num_kv_pairs: int, target: str = "value") -> GroundTruth:
    """inputs, labels [B, T] of MQAR examples with num_kv_pairs pairs -> where each query must read.

    Every example must have the same number of labelled positions (the generator labels exactly N), and every
    query's key must appear once among the context keys."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    labelled = labels >= 0
    counts = labelled.sum(1)
    if not (counts == counts[0]).all() or counts[0] == 0:
        raise ValueError(f"every example needs the same number (> 0) of labelled positions, got {counts.tolist()}")
    # Labelled positions in order: the stable sort puts the True columns first, by position.
    query_positions = torch.sort((~labelled).to(torch.uint8), dim=1, stable=True).indices[:, : int(counts[0])]
    query_keys = inputs.gather(1, query_positions)  # [B, Q]
    context_keys = inputs[:, 0 : 2 * num_kv_pairs : 2]  # [B, N]
    matches = query_keys[:, :, None] == context_keys[:, None, :]  # [B, Q, N]
    if not (matches.sum(-1) == 1).all():
        raise ValueError("a query's key is missing from (or repeated in) the context keys: not MQAR examples")
    targets = torch.zeros(*matches.shape[:2], 2 * num_kv_pairs, dtype=torch.bool, device=inputs.device)
    if target in ("key", "pair"):
        targets[:, :, 0::2] = matches
    if target in ("value", "pair"):
        targets[:, :, 1::2] = matches
    return GroundTruth(query_positions, targets, num_kv_pairs)


def query_rows(scores: Tensor, truth: GroundTruth) -> Tensor:
    """scores [B, T, T] (one head, or the mean over heads) -> the query rows [B, Q, T]."""
    index = truth.query_positions[:, :, None].expand(-1, -1, scores.shape[-1])
    return scores.gather(1, index)


def iou_per_example(scores: Tensor, truth: GroundTruth, rule: BinarisationRule) -> Tensor:
    """scores [B, T, T] -> IoU [B] of the binarised query rows, cropped to the key-value columns, with truth."""
    predicted = binarise(query_rows(scores, truth)[..., : 2 * truth.num_kv_pairs], rule)  # [B, Q, C]
    intersection = (predicted & truth.targets).sum((1, 2))
    union = (predicted | truth.targets).sum((1, 2))
    return intersection.double() / union.double()


def _full_targets(truth: GroundTruth, length: int) -> Tensor:
    """truth.targets widened to every column: [B, Q, T]."""
    pad = length - truth.targets.shape[-1]
    return torch.nn.functional.pad(truth.targets, (0, pad))


def mass_on_targets(scores: Tensor, truth: GroundTruth) -> tuple[Tensor, Tensor]:
    """scores [B, T, T] -> (mass on the ground-truth positions, mass on every other position), each [B, Q]."""
    rows = query_rows(scores, truth).double()
    right = (rows * _full_targets(truth, rows.shape[-1])).sum(-1)
    return right, rows.sum(-1) - right


def row_entropy(scores: Tensor, truth: GroundTruth) -> Tensor:
    """scores [B, T, T] -> entropy in nats [B, Q] of each query row, normalised to sum 1 (0 log 0 = 0)."""
    rows = query_rows(scores, truth).double().clamp_min(0)  # the identity map's raw scores can be negative
    p = rows / rows.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return -torch.special.xlogy(p, p).sum(-1)


def query_accuracy(logits: Tensor, labels: Tensor, truth: GroundTruth) -> Tensor:
    """logits [B, T, V], labels [B, T] -> [B, Q] bool: the model's argmax equals the label at each query."""
    predicted = logits.argmax(-1).gather(1, truth.query_positions)
    return predicted == labels.gather(1, truth.query_positions)
