"""rebased.train under numerical faults: a non-finite loss or gradient skips its step (nothing changes) and is
counted; a run of them ends the run as diverged with its last good weights; no checkpoint holds non-finite
weights."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from train_script import make_data, make_model

from rebased.testing import assert_close
from rebased.train import CHECKPOINT_FILE, METRICS_FILE, TrainConfig, train

QUICK = dict(batch_size=16, lr=1e-2, early_stop_metric=None, device="cpu", schedule="constant")  # 8 steps/epoch


class Poisoned(nn.Module):
    """The tiny model, with NaN put into the loss ("loss") or only into the gradients ("grad") at the given
    training steps (0-based, one forward per step)."""

    def __init__(self, steps: set[int] | range, where: str = "loss"):
        super().__init__()
        self.inner, self.steps, self.where, self.calls = make_model(), steps, where, 0

    def forward(self, ids: Tensor, select: Tensor | None = None) -> Tensor:
        logits = self.inner(ids, select)
        if self.training:
            poisoned, self.calls = self.calls in self.steps, self.calls + 1
            if poisoned and self.where == "loss":
                return logits * math.nan
            if poisoned:
                logits.register_hook(lambda grad: grad * math.nan)
        return logits


def snapshots_after_each_step(model: nn.Module):
    """The parameters after every optimizer step, through a global step hook."""
    seen: list[list[Tensor]] = []
    hook = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: seen.append([p.detach().clone() for p in model.parameters()])
    )
    return seen, hook


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nonfinite_step_is_skipped_changes_nothing_and_is_counted(where, tmp_path):
    model = Poisoned({3, 5}, where)
    seen, hook = snapshots_after_each_step(model)
    try:
        result = train(model, make_data(), TrainConfig(epochs=2, **QUICK), tmp_path, progress=False)
    finally:
        hook.remove()
    assert result.skipped_steps == 2 and not result.diverged and result.steps == 16
    for skipped in (3, 5):  # the step left every parameter exactly as the step before it did
        for before, after in zip(seen[skipped - 1], seen[skipped]):
            assert torch.equal(before, after)
    assert not torch.equal(seen[3][0], seen[4][0])  # ...and the next good step learns again
    entries = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [e["skipped_steps"] for e in entries] == [2, 2]
    assert all(math.isfinite(e["train_loss"]) for e in entries)  # the mean over the good steps only
    assert all(p.isfinite().all() for p in model.parameters())


def test_run_of_nonfinite_steps_ends_as_diverged_with_last_good_weights(tmp_path):
    model = Poisoned(range(6, 10**6))
    seen, hook = snapshots_after_each_step(model)
    config = TrainConfig(epochs=10, max_skipped_in_a_row=4, **QUICK)
    try:
        result = train(model, make_data(), config, tmp_path, progress=False)
    finally:
        hook.remove()
    assert result.diverged and result.finished
    assert result.steps == 10 and result.skipped_steps == 4  # 6 good steps, then the 4 skipped in a row
    stored = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    for name, last_good in zip(stored["model"], seen[5]):  # the weights after step 5, the last good one
        assert_close(stored["model"][name], last_good, rel_rms=0.0, name=name)
    again = train(Poisoned(range(6, 10**6)), make_data(), config, tmp_path, progress=False)
    assert again.diverged and again.steps == result.steps  # a finished run is not trained again


def test_checkpoint_is_never_written_from_nonfinite_weights(tmp_path):
    model = make_model()

    def corrupt(m: nn.Module) -> dict[str, float]:  # something outside the step breaks the weights
        if corrupt.calls == 1:
            next(m.parameters()).data[0] = math.nan
        corrupt.calls += 1
        return {"accuracy": 0.0}

    corrupt.calls = 0
    with pytest.raises(FloatingPointError, match="last good"):
        train(model, make_data(), TrainConfig(epochs=3, **QUICK), tmp_path, evaluate=corrupt, progress=False)
    stored = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert stored["state"]["epoch"] == 1  # the checkpoint of the first epoch is the one kept
    assert all(t.isfinite().all() for t in stored["model"].values())
