"""The optimizer step as one CUDA graph (TrainConfig.cuda_graph): forward, backward, clipping and AdamW over a
global batch, replayed with one launch.

Why: at short MQAR lengths (L 128, batch 512) a step is 3-6 ms of GPU work inside 12-25 ms of wall time; the
host spends the rest issuing a few hundred kernels through Python and autograd. A replayed graph issues them
all at once, so the GPU work bounds the step.

What it needs: the same shapes at every step (the label-table batches of examples held in memory), one process
(no DDP) and a CUDA device. The first WARMUP_STEPS steps run eagerly on a side stream: lazy set-up (cuBLAS
handles, Triton compiles and autotuning, the optimizer's moments) must happen outside a capture. They are real
training steps. The next step is captured once, on that step's batch tensors as the graph's inputs, and every
step from then on copies its batch into those tensors, writes its learning rate into the device tensor the
captured AdamW reads, and replays. Same kernels in the same order as the eager step, so the same training.
A model whose step cannot be captured (a mixer that waits for the device, say) trains on eagerly, with a
warning, after CAPTURE_ATTEMPTS tries (a failure can be transient: see capture()). `replaying` says which it is.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable

import torch
from torch import Tensor

from rebased.train.batches import GlobalBatch

log = logging.getLogger(__name__)

WARMUP_STEPS = 3  # eager steps before the capture (PyTorch's guidance for whole-network capture)
CAPTURE_ATTEMPTS = 2  # a failed capture is tried again after WARMUP_STEPS more eager steps, once

StepFunction = Callable[[GlobalBatch, "float | Tensor"], tuple[Tensor, Tensor]]


class GraphedStep:
    """Call it as the eager step is called: (batch, lr) -> (mean loss, skipped), both on the device."""

    def __init__(self, step: StepFunction, optimizer: torch.optim.Optimizer, device: torch.device,
                 warmup_steps: int = WARMUP_STEPS):  # fmt: skip
        self.step, self.optimizer, self.device = step, optimizer, device
        self.warmup_steps = self.warmup_left = warmup_steps
        self.attempts_left = CAPTURE_ATTEMPTS
        self.failed = False  # every capture attempt failed: every step eager (give_up)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: GlobalBatch | None = None
        self.outputs: tuple[Tensor, Tensor] | None = None
        self.lr = torch.zeros((), dtype=torch.float32, device=device)
        self.side = torch.cuda.Stream(device)

    def __call__(self, batch: GlobalBatch, lr: float) -> tuple[Tensor, Tensor]:
        if self.warmup_left > 0:
            self.warmup_left -= 1
            return self.eager_on_side_stream(batch, lr)
        if self.failed:
            return self.eager_on_side_stream(batch, lr)
        if self.graph is None:
            try:
                self.capture(batch)
            except RuntimeError as error:  # a model whose step cannot be captured: train on without the graph
                self.give_up(error)
                return self.eager_on_side_stream(batch, lr)
        else:
            self.load(batch)
        self.lr.fill_(lr)
        self.graph.replay()
        total, skipped = self.outputs
        return total.clone(), skipped.clone()  # the next replay overwrites the graph's own outputs

    @property
    def replaying(self) -> bool:
        """Whether the steps since the capture replay the graph (False before it and after a capture gave up)."""
        return self.graph is not None

    def eager_on_side_stream(self, batch: GlobalBatch, lr: float) -> tuple[Tensor, Tensor]:
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            result = self.step(batch, lr)
        torch.cuda.current_stream(self.device).wait_stream(self.side)
        return result

    def capture(self, batch: GlobalBatch) -> None:
        if not isinstance(batch.count, Tensor):
            raise ValueError("a captured step needs the batch's label count on the device (label-table batches)")
        for group in self.optimizer.param_groups:
            group["capturable"] = True  # AdamW refuses a capture otherwise; its step counts are on the device
        self.optimizer.zero_grad(set_to_none=True)  # the captured backward writes the gradients, not adds to them
        self.inputs, self.graph = batch, torch.cuda.CUDAGraph()
        index = torch.cuda.current_device() if self.device.index is None else self.device.index
        generator = torch.cuda.default_generators[index]
        before = generator.clone_state()
        # Python's cycle collector off for the capture: one that runs inside it can free a dead cycle's CUDA
        # memory (a finished run's trainer and graph, in a sweep or benchmark that trains many in one process),
        # and the capture fails ("operation failed due to a previous error during capture"). Seen once in seven
        # trainings of one benchmark process on an H200; torch.cuda.graph no longer collects before capturing.
        gc.collect()
        collecting = gc.isenabled()
        gc.disable()
        try:
            # On the warm-up's stream: the autograd nodes the warm-up made remember their stream, and a capture on
            # another one would have to wait for it. Waits for the device once, to start from a quiet GPU.
            with torch.cuda.graph(self.graph, stream=self.side):
                self.outputs = self.step(self.inputs, self.lr)
        except RuntimeError:
            # A capture that breaks off leaves the default generator in capture mode, and every later eager
            # dropout then fails ("Offset increment outside graph capture"): put back its state from before.
            generator.graphsafe_set_state(before)
            raise
        finally:
            if collecting:
                gc.enable()

    def give_up(self, error: RuntimeError) -> None:
        """After a failed capture, which ran nothing (a capture records kernels, it does not run them): the
        optimizer as the eager step keeps it, and eager steps: WARMUP_STEPS of them before the next attempt,
        or all of them once the attempts are spent."""
        self.attempts_left -= 1
        self.failed = self.attempts_left == 0
        then = "so it runs without one" if self.failed else f"trying again after {self.warmup_steps} eager steps"
        log.warning("the training step could not be captured as a CUDA graph, %s: %s", then, error)
        self.warmup_left = 0 if self.failed else self.warmup_steps
        self.graph, self.inputs, self.outputs = None, None, None
        for group in self.optimizer.param_groups:
            group["capturable"] = False
        self.optimizer.zero_grad(set_to_none=True)

    def load(self, batch: GlobalBatch) -> None:
        """Copies a batch into the captured one's tensors (same shapes: label-table batches)."""
        for static, new in zip(self.inputs.parts, batch.parts, strict=True):
            for into, source in zip(static, new, strict=True):
                into.copy_(source)
        self.inputs.count.copy_(batch.count)


def eager_optimizer_state(state: dict) -> dict:
    """An optimizer state_dict as the eager step keeps it (lr a float, not capturable), for checkpoints: a
    run resumed without the graph then steps as it always does. Reads the lr tensor: a sync, at checkpoints only."""
    for group in state["param_groups"]:
        if isinstance(group.get("lr"), Tensor):
            group["lr"] = float(group["lr"])
        group["capturable"] = False
    return state
