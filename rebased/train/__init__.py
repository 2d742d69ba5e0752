"""Training: one loop for every task (loop.py), what it learns from (examples.py) and how a batch of it reaches
the device (batches.py), the step as a CUDA graph (graphed.py), tokens/s and MFU (meter.py), the files a run
folder holds (run_files.py), the label convention (labels.py) and accuracy at labelled positions (evaluate.py)."""

from rebased.train.batches import labelled_positions
from rebased.train.examples import Examples, ExampleTensors
from rebased.train.labels import IGNORE_INDEX
from rebased.train.loop import (
    TrainConfig,
    TrainResult,
    batch_order,
    labelled_logits,
    lr_at,
    takes_select,
    total_steps,
    train,
)
from rebased.train.meter import Meter
from rebased.train.run_files import CHECKPOINT_FILE, METRICS_FILE, TRAIN_CONFIG_FILE

__all__ = [
    "CHECKPOINT_FILE", "Examples", "ExampleTensors", "IGNORE_INDEX", "METRICS_FILE", "Meter", "TRAIN_CONFIG_FILE",
    "TrainConfig", "TrainResult", "batch_order", "labelled_logits", "labelled_positions", "lr_at", "takes_select",
    "total_steps", "train",
]  # fmt: skip
