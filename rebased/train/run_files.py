"""What a training run keeps in its folder, and how it is written and read back (rank 0 writes).

    train_config.json   the TrainConfig (not config.json: that name is the model's, beside its weights)
    metrics.jsonl       one JSON line per evaluation
    checkpoint.pt       model, optimizer, RunState and every rank's RNG states: enough to resume exactly

Every file is written to a temporary name and renamed into place, so a reader (or a run killed mid-write)
never sees a partial file. A checkpoint is refused when the settings that change the numbers differ.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from rebased.files import atomic_write

CHECKPOINT_FILE, METRICS_FILE, TRAIN_CONFIG_FILE = "checkpoint.pt", "metrics.jsonl", "train_config.json"
# They do not change the numbers (cuda_graph and fused_loss: the same computation, to rounding).
MAY_CHANGE_ON_RESUME = {"device", "compile", "checkpoint_every", "cuda_graph", "fused_loss"}


@dataclass
class RunState:
    """Everything about the run's position that a checkpoint must restore, besides model and optimizer."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # optimizer steps done in the current epoch
    step: int = 0
    lr: float = 0.0
    loss_sum: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))  # since the last row
    loss_count: int = 0  # optimizer steps since the last metrics row, skipped ones included
    # Counters kept on the device, so that watching for non-finite steps costs no host sync per step:
    skipped_since_eval: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))
    skipped_steps: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))  # in the whole run
    skipped_in_a_row: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))  # ending here
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)  # the evaluations' metrics rows
    loss_rows: list[dict] = field(default_factory=list)  # the rows of training loss alone (log_every_steps)
    stopped_early: bool = False
    diverged: bool = False  # stopped by a run of non-finite steps
    done: bool = False

    def to(self, device: torch.device) -> RunState:
        """The device counters moved to `device` (the checkpoint keeps them on the CPU)."""
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(self, name, value.to(device))
        return self


def jsonable(config) -> dict:
    """A dataclass as it comes back from JSON (tuples become lists), so stored and current settings compare."""
    return json.loads(json.dumps(asdict(config)))


class RunFiles:
    """The run folder of one training run (or nothing at all, for run_dir=None)."""

    def __init__(self, run_dir: str | Path | None, config):
        self.dir = None if run_dir is None else Path(run_dir)
        self.config = jsonable(config)
        self.defaults = jsonable(type(config)())  # what a setting absent from an older checkpoint meant

    def write_start(self, rows: list[dict]) -> None:
        """train_config.json, and metrics.jsonl cut back to the checkpoint's rows (a killed run wrote more)."""
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        config_text = json.dumps(self.config, indent=2) + "\n"
        atomic_write(self.dir / TRAIN_CONFIG_FILE, lambda f: f.write(config_text.encode()))
        lines = "".join(json.dumps(entry) + "\n" for entry in rows)
        atomic_write(self.dir / METRICS_FILE, lambda f: f.write(lines.encode()))

    def append_metrics(self, entry: dict) -> None:
        if self.dir is not None:
            with open(self.dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def save(self, model_state: dict, optimizer_state: dict, state: RunState, rng: list[dict]) -> None:
        if self.dir is None:
            return
        run_state = {name: value.cpu() if isinstance(value, Tensor) else value for name, value in vars(state).items()}
        payload = {"model": model_state, "optimizer": optimizer_state, "state": run_state, "rng": rng}
        payload["config"] = self.config
        atomic_write(self.dir / CHECKPOINT_FILE, lambda f: torch.save(payload, f))

    def load(self, world: int) -> dict | None:
        """The checkpoint, checked against the current settings and process count; None when there is none."""
        path = None if self.dir is None else self.dir / CHECKPOINT_FILE
        if path is None or not path.exists():
            return None
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        stored = checkpoint["config"]
        fixed = [k for k in self.config if k not in MAY_CHANGE_ON_RESUME]
        changed = sorted(k for k in fixed if stored.get(k, self.defaults[k]) != self.config[k])
        if changed:
            raise ValueError(f"{path} was written with other settings: {[(k, stored.get(k)) for k in changed]}")
        if len(checkpoint["rng"]) != world:
            raise ValueError(f"{path} was written by {len(checkpoint['rng'])} processes, not {world}")
        checkpoint["state"] = RunState(**checkpoint["state"])
        return checkpoint
