"""The two batch sources: the label table against labelled_positions, and training through either gives the
same model."""

import copy

import pytest
import torch

from rebased.model import LanguageModel
from rebased.presets import tiny
from rebased.testing import assert_close
from rebased.train import ExampleTensors, TrainConfig, train
from rebased.train.batches import (
    HostBatches,
    LabelTableBatches,
    batch_source,
    label_table,
    memory_of,
    table_bytes,
)
from rebased.train.labels import IGNORE_INDEX


def random_labels(rows: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels with a random share of labelled positions per row, a row with none and a row with
    all among them."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (rows, length), generator=generator)
    share = torch.rand(rows, 1, generator=generator)
    labels = torch.where(torch.rand(rows, length, generator=generator) < share, ids, IGNORE_INDEX)
    labels[0] = IGNORE_INDEX
    labels[1] = ids[1]
    return ids, labels


@pytest.mark.parametrize("rows_per_pass", [1, 3, 8192])
def test_label_table_lists_each_rows_labels_in_order_then_padding(monkeypatch, rows_per_pass):
    monkeypatch.setattr("rebased.train.batches.TABLE_ROWS_PER_PASS", rows_per_pass)
    _, labels = random_labels(7, 11)
    positions, targets = label_table(labels)
    assert positions.shape == targets.shape == (7, 11)  # row 1 is labelled everywhere
    for row in range(7):
        labelled = (labels[row] != IGNORE_INDEX).nonzero().squeeze(1)
        n = len(labelled)
        assert torch.equal(positions[row, :n].long(), labelled)
        assert torch.equal(targets[row, :n].long(), labels[row, labelled])
        assert (positions[row, n:] == 0).all() and (targets[row, n:] == IGNORE_INDEX).all()


def test_label_table_of_no_labels_is_empty():
    positions, targets = label_table(torch.full((3, 5), IGNORE_INDEX))
    assert positions.shape == targets.shape == (3, 0)


def test_both_sources_give_the_same_loss_and_count():
    """Per micro-batch, the table's padded positions add nothing: the summed loss and the count agree."""
    ids, labels = random_labels(12, 9, seed=1)
    model = LanguageModel(tiny("rebased", vocab_size=50))
    indices, parts = torch.tensor([5, 0, 11, 3, 1, 8]), [slice(0, 3), slice(3, 6)]
    host = HostBatches(ExampleTensors(ids, labels), torch.device("cpu")).load(indices, parts)
    table = LabelTableBatches(ExampleTensors(ids, labels), torch.device("cpu")).load(indices, parts)
    assert int(host.count) == int(table.count) == int((labels[indices] != IGNORE_INDEX).sum())
    for a, b in zip(host.parts, table.parts, strict=True):
        assert torch.equal(a.inputs, b.inputs.long())
        losses = [
            torch.nn.functional.cross_entropy(model(p.inputs, select=p.positions), p.targets, reduction="sum")
            for p in (a, b)
        ]
        assert_close(losses[1], losses[0], rel_rms=1e-6, name="summed loss")


class ListExamples:
    """Examples that are not ExampleTensors: the host path."""

    def __init__(self, ids, labels):
        self.ids, self.labels = ids, labels

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, rows):
        return self.ids[rows], self.labels[rows]


def test_training_through_either_source_gives_the_same_model():
    ids, labels = random_labels(64, 12, seed=2)
    initial = LanguageModel(tiny("rebased", vocab_size=50))
    config = TrainConfig(epochs=2, batch_size=16, grad_accumulation=2, lr=3e-3, early_stop_metric=None)
    by_table, by_host = copy.deepcopy(initial), copy.deepcopy(initial)
    table = train(by_table, ExampleTensors(ids, labels), config, progress=False)
    host = train(by_host, ListExamples(ids, labels), config, progress=False)
    assert table.steps == host.steps == 8
    assert table.history[-1]["train_loss"] == pytest.approx(host.history[-1]["train_loss"], rel=1e-5)
    for (name, p), q in zip(by_table.state_dict().items(), by_host.state_dict().values()):
        assert_close(p, q, rel_rms=1e-5, name=name)
    assert not torch.equal(by_table.lm_head.weight, initial.lm_head.weight)


def test_examples_beyond_the_memory_share_come_through_the_host(monkeypatch):
    ids, labels = random_labels(12, 9)
    examples = ExampleTensors(ids, labels)
    assert isinstance(batch_source(examples, torch.device("cpu")), LabelTableBatches)
    assert table_bytes(examples) == 12 * (4 * 9 + 8 * 9)  # row 1 is labelled everywhere
    monkeypatch.setattr(
        "rebased.train.batches.TABLE_MEMORY_SHARE", table_bytes(examples) / memory_of(torch.device("cpu")) / 2
    )
    assert isinstance(batch_source(examples, torch.device("cpu")), HostBatches)
