"""One training loop for every task: AdamW, warmup + cosine, accumulation, clipping, bf16, DDP, exact resume.

Loss: cross-entropy over the labelled positions (labels != -100) of a global batch, divided by their count in
the whole global batch, so micro-batches and ranks add up to exactly the gradient of one big batch.
The data position is (epoch, batch): each epoch's order is a permutation of the examples from a generator
seeded by (seed, epoch), so resuming needs no data-loader state (rebased.train.examples). What run_dir holds,
and how it is written and checked on resume: rebased.train.run_files.
Under `torchrun --nproc_per_node N` every rank takes its slice of each global batch (PyTorch DDP).
"""

from __future__ import annotations

import gc
import importlib
import inspect
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from rebased.model import select_positions
from rebased.train.batches import GlobalBatch, MicroBatch, batch_source
from rebased.train.examples import Examples, ExampleTensors
from rebased.train.graphed import GraphedStep, eager_optimizer_state
from rebased.train.labels import IGNORE_INDEX
from rebased.train.meter import Meter, RateWindows
from rebased.train.run_files import RunFiles, RunState

log = logging.getLogger(__name__)


def takes_select(model: nn.Module) -> bool:
    """Whether model.forward(ids, select=positions) computes logits only at the given positions (flat indices
    b * T + t, as labelled_positions returns them)."""
    return "select" in inspect.signature(model.forward).parameters


def takes_targets(model: nn.Module) -> bool:
    """Whether model.forward(ids, select=positions, targets=labels) returns the summed cross-entropy itself."""
    return "targets" in inspect.signature(model.forward).parameters


def labelled_logits(forward: Callable, inputs: Tensor, positions: Tensor, select: bool) -> Tensor:
    """Logits [M, V] at M positions (a boolean mask [B, T] or flat indices b * T + t); a model without
    `select` computes all, then keeps those."""
    return forward(inputs, select=positions) if select else select_positions(forward(inputs), positions)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 64
    batch_size: int = 512  # global batch per optimizer step (all ranks x all accumulation micro-batches)
    grad_accumulation: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    weight_decay: float = 0.1  # on matrices and embeddings only, not on biases and norm gains
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0  # in schedule_unit: linear warmup over this many steps (or epochs)
    schedule: str = "cosine"  # "cosine" | "constant"
    schedule_unit: str = "epoch"  # "epoch": lr set at each epoch start | "step"
    min_lr: float = 0.0
    grad_clip: float | None = 1.0
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU | "fp32" | "bf16"
    compile: bool = False
    cuda_graph: bool = False  # the optimizer step as one CUDA graph (rebased.train.graphed): CUDA, one process
    # The model's fused head + cross-entropy (forward(..., targets=)) where it has one: the [M, V] logits are
    # never held (rebased.ops.cross_entropy). False: logits, then F.cross_entropy.
    fused_loss: bool = True
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    eval_every_steps: int = 0  # > 0: also evaluate every this many optimizer steps (long epochs: language models)
    log_every_steps: int = 0  # > 0: a metrics row of training loss every this many steps, between evaluations
    early_stop_metric: str | None = "accuracy"  # higher is better
    early_stop_threshold: float = 0.99  # stop once the metric is above this
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = at epoch ends only
    seed: int = 0
    device: str = "auto"  # "auto": cuda if available else cpu
    max_steps: int | None = None  # stop after this many optimizer steps
    max_skipped_in_a_row: int = 20  # non-finite steps in a row (each skipped) that stop the run as diverged

    def __post_init__(self):
        choices = {"schedule": SCHEDULES, "schedule_unit": ("epoch", "step"), "precision": ("auto", "fp32", "bf16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {sorted(allowed)}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "grad_accumulation", "eval_every", "max_skipped_in_a_row"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every_steps", "log_every_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")


@dataclass
class TrainResult:
    # one dict per evaluation: epoch, step, lr, train_loss, seconds, evaluate()'s metrics and eval_seconds (the
    # evaluation's own wall time)
    history: list[dict]
    best: dict  # the history entry with the best early_stop_metric (or the last, if None)
    stopped_early: bool
    steps: int
    seconds: float
    finished: bool = True  # False: stopped at stop_at; train() again with the same run_dir resumes it
    diverged: bool = False  # stopped after max_skipped_in_a_row non-finite steps; the weights are the last good
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient norm
    # TrainConfig.cuda_graph runs: whether this call's steps ended replaying the captured graph (False: they ran
    # eagerly, every capture attempt having failed, or the call ended before its capture); None without it
    cuda_graph: bool | None = None


# Decay shapes on progress p in [0, 1]: the fraction of (lr - min_lr) left.
SCHEDULES: dict[str, Callable[[float], float]] = {
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
    "constant": lambda p: 1.0,
}


def total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    steps = config.epochs * steps_per_epoch
    return steps if config.max_steps is None else min(steps, config.max_steps)


def lr_at(config: TrainConfig, step: int, epoch: int, steps_per_epoch: int) -> float:
    """Learning rate of optimizer step `step` (0-based), which lies in epoch `epoch` (0-based).

    The schedule runs on a clock t of T ticks: t = epoch, T = epochs ("epoch": constant within an epoch, as
    torch's CosineAnnealingLR stepped per epoch), or t = step, T = total steps ("step"). With W = warmup_steps:
    lr (t + 1) / W for t < W, then min_lr + (lr - min_lr) shape((t - W) / (T - W)), shape from SCHEDULES.
    """
    if config.schedule_unit == "epoch":
        t, ticks = epoch, config.epochs
    else:
        t, ticks = step, total_steps(config, steps_per_epoch)
    warmup = config.warmup_steps
    if t < warmup:
        return config.lr * (t + 1) / warmup
    progress = min(1.0, (t - warmup) / max(1, ticks - warmup))
    return config.min_lr + (config.lr - config.min_lr) * SCHEDULES[config.schedule](progress)


def batch_order(num_examples: int, batch_size: int, seed: int, epoch: int) -> Tensor:
    """The global batches of one epoch, [steps, batch_size] example indices (the incomplete tail dropped)."""
    generator = torch.Generator().manual_seed((seed << 32) + epoch)  # a fresh stream per (seed, epoch)
    steps = num_examples // batch_size
    return torch.randperm(num_examples, generator=generator)[: steps * batch_size].view(steps, batch_size)


@dataclass
class _Dist:
    rank: int
    world: int
    device: torch.device
    owns_group: bool  # we initialised the process group, so we tear it down


def resolve_device(name: str) -> torch.device:
    """A device name, "auto" being cuda where there is a GPU, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _setup_distributed(config: TrainConfig) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(config.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)  # nccl and all_gather_object use the current device
    owns = world > 1 and not dist.is_initialized()
    if owns:
        # DDP imports this module lazily, and its functions take the default group as a default argument: imported
        # after init, they keep the group alive past destroy_process_group, so gloo's worker threads outlive it and
        # can abort the process as the interpreter exits (a work item freeing a tensor needs the GIL).
        importlib.import_module("torch.distributed.nn.functional")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Dist(rank, world, device, owns)


def _check_data(train_data: Examples | tuple[Tensor, Tensor], config: TrainConfig, world: int) -> Examples:
    examples = ExampleTensors(*train_data) if isinstance(train_data, tuple) else train_data
    if len(examples) < config.batch_size:
        raise ValueError(f"batch_size={config.batch_size} is larger than the {len(examples)} training examples")
    parts = world * config.grad_accumulation
    if config.batch_size % parts:
        raise ValueError(
            f"batch_size={config.batch_size} must divide into {world} ranks x {parts // world} micro-batches"
        )
    return examples


def micro_batch_slices(batch_size: int, env: _Dist, grad_accumulation: int) -> list[slice]:
    """This rank's micro-batches: slices of a global batch, each rank's share split into grad_accumulation."""
    share = batch_size // env.world
    size = share // grad_accumulation
    return [slice(env.rank * share + i * size, env.rank * share + (i + 1) * size) for i in range(grad_accumulation)]


class _Engine:
    """The state of one call to train(): model, optimizer, data, and where the run is."""

    def __init__(self, model, train_data, config, run_dir, evaluate, progress, env: _Dist, stop_when, meter):
        self.config, self.env, self.evaluate, self.progress = config, env, evaluate, progress
        self.stop_when = stop_when  # () -> bool, asked after every optimizer step; None: never
        self.rates = RateWindows(meter)
        self.interrupted = False
        self.files = RunFiles(run_dir, config)
        self.examples = _check_data(train_data, config, env.world)
        self.steps_per_epoch = len(self.examples) // config.batch_size
        self.batches = batch_source(self.examples, env.device)
        self.parts = micro_batch_slices(config.batch_size, env, config.grad_accumulation)
        self.model = model.to(env.device)
        self.select = takes_select(model)
        self.fused_loss = config.fused_loss and takes_targets(model)
        matrices = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
        others = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
        groups = [g for g in ({"params": matrices}, {"params": others, "weight_decay": 0.0}) if g["params"]]
        # fused: one kernel for all parameters, and it honours found_inf (see optimizer_step) on CPU and GPU
        self.optimizer = torch.optim.AdamW(
            groups, config.lr, config.betas, weight_decay=config.weight_decay, fused=True
        )
        bf16 = config.precision == "bf16" or (config.precision == "auto" and env.device.type == "cuda")
        self.dtype = torch.bfloat16 if bf16 else None
        self.ddp = self.forward = None
        self.graphed = self.graphed_step() if config.cuda_graph else None

    def graphed_step(self) -> GraphedStep:
        needs = [
            (self.env.device.type == "cuda", f"a CUDA device (this run trains on {self.env.device})"),
            (self.env.world == 1, "one process (not DDP)"),
            (
                self.batches.fixed_shapes,
                "examples in memory that fit a quarter of the device's (ExampleTensors; "
                "rebased.train.batches.TABLE_MEMORY_SHARE): the same shapes at every step",
            ),
        ]
        for met, need in needs:
            if not met:
                raise ValueError(f"cuda_graph=True needs {need}")
        return GraphedStep(self.compute_step, self.optimizer, self.env.device)

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        # A captured step must cast the weights in every replay, not once into autocast's cache.
        return torch.autocast(self.env.device.type, dtype=self.dtype, cache_enabled=self.graphed is None)

    def wrap(self) -> None:
        """DDP and compile come after restoring, so DDP's initial broadcast sends the restored weights."""
        self.forward = self.model
        if self.env.world > 1:
            ids = [self.env.device.index] if self.env.device.type == "cuda" else None
            self.ddp = self.forward = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if self.config.compile:
            self.forward = torch.compile(self.forward)

    def labelled_loss(self, part: MicroBatch) -> Tensor:
        """Cross-entropy summed over the labelled positions of a micro-batch: by the model itself where it
        can (the fused head and loss, never holding the [M, V] logits), else from its logits."""
        with self.autocast():
            if self.fused_loss:
                return self.forward(part.inputs, select=part.positions, targets=part.targets)
            logits = labelled_logits(self.forward, part.inputs, part.positions, self.select)  # [M, V]
        return F.cross_entropy(logits.float(), part.targets, reduction="sum", ignore_index=IGNORE_INDEX)

    def optimizer_step(self, indices: Tensor, lr: float) -> tuple[Tensor, Tensor]:
        """One step on a global batch of example indices; returns its mean loss over labelled positions and
        whether the step was skipped (a non-finite loss or gradient norm), both on the device. Nothing on the
        way makes the host wait for the GPU, so the host queues work ahead of it."""
        batch = self.batches.load(indices, self.parts)
        return self.compute_step(batch, lr) if self.graphed is None else self.graphed(batch, lr)

    def compute_step(self, batch: GlobalBatch, lr: float | Tensor) -> tuple[Tensor, Tensor]:
        """Forward, backward and update on a loaded batch."""
        world = self.env.world
        total = torch.zeros((), dtype=torch.float64, device=self.env.device)
        for i, part in enumerate(batch.parts):
            last = i == len(batch.parts) - 1
            with nullcontext() if last or self.ddp is None else self.ddp.no_sync():
                loss = self.labelled_loss(part) / batch.count
                (loss * world).backward()  # DDP averages gradients over ranks; the batch gradient is their sum
            total += loss.detach()
        if world > 1:
            dist.all_reduce(total)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        clip = math.inf if self.config.grad_clip is None else self.config.grad_clip
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), clip)  # the same on every rank after DDP
        skipped = ~(torch.isfinite(total) & torch.isfinite(norm))
        # The fused AdamW skips the whole update (moments and step count too) where found_inf is 1. Deciding on
        # the device keeps the host from waiting for the GPU at every step.
        self.optimizer.found_inf = skipped.float()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, skipped

    def run_evaluation(self) -> dict[str, float]:
        """evaluate(model) on rank 0, in eval mode without gradients; the metrics are broadcast to every rank."""
        metrics = {}
        if self.evaluate is not None and self.env.rank == 0:
            self.model.eval()
            with torch.no_grad(), self.autocast():
                metrics = {name: float(value) for name, value in self.evaluate(self.model).items()}
            self.model.train()
        if self.env.world > 1:
            box = [metrics]
            dist.broadcast_object_list(box, src=0)
            metrics = box[0]
        return metrics

    def rng_states(self) -> list[dict]:
        mine = {"cpu": torch.get_rng_state()}
        if self.env.device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(self.env.device)
        if self.env.world == 1:
            return [mine]
        states = [None] * self.env.world
        dist.all_gather_object(states, mine)  # each rank's dropout stream, so every rank resumes exactly
        return states

    def save(self, state: RunState) -> None:
        if self.files.dir is None:
            return
        finite = torch.stack([p.isfinite().all() for p in self.model.parameters()]).all()
        if not finite.item():  # the skipped steps keep this from happening; a checkpoint must never hold it
            raise FloatingPointError(
                f"the weights became non-finite by step {state.step}; {self.files.dir / 'checkpoint.pt'} still "
                "holds the last good ones: resume from it with a lower lr or a smaller grad_clip"
            )
        rng = self.rng_states()  # a collective: every rank takes part, rank 0 writes
        if self.env.rank == 0:
            self.files.save(self.model.state_dict(), eager_optimizer_state(self.optimizer.state_dict()), state, rng)

    def restore(self) -> RunState:
        checkpoint = self.files.load(self.env.world)
        if checkpoint is None:
            return RunState()
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        rng = checkpoint["rng"][self.env.rank]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.env.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.env.device)
        state = checkpoint["state"]
        log.info("resumed %s at epoch %d, step %d", self.files.dir, state.epoch, state.step)
        return state

    def record_evaluation(self, state: RunState, seconds: float) -> None:
        if self.evaluate is not None and self.env.device.type == "cuda":
            # The host runs ahead of the device: wait for the queued training steps (once per evaluation), so
            # that they count in the training window's rates and not in the evaluation's seconds.
            torch.cuda.synchronize(self.env.device)
        rates = self.rates.read(state.step, "metrics")
        started = time.perf_counter()
        metrics = self.run_evaluation()
        if self.evaluate is not None:
            metrics["eval_seconds"] = round(time.perf_counter() - started, 3)  # evaluate() ends waiting for it
        self.rates.restart(state.step)
        entry = {**self.training_row(state, seconds), **rates, **metrics}
        state.history.append(entry)
        self.write_row(entry)
        name = self.config.early_stop_metric
        if name is not None and self.evaluate is not None:
            if name not in metrics:
                raise ValueError(f"early_stop_metric={name!r} is not among the metrics {sorted(metrics)}")
            state.stopped_early = metrics[name] > self.config.early_stop_threshold

    def record_training_loss(self, state: RunState, seconds: float) -> None:
        """A row without evaluation, so that a long run's loss curve has more points than its evaluations."""
        entry = {**self.training_row(state, seconds), **self.rates.read(state.step, "metrics")}
        state.loss_rows.append(entry)
        self.write_row(entry)

    @staticmethod
    def training_row(state: RunState, seconds: float) -> dict:
        """Where the run is, and its mean training loss over the good steps since the last row (which it resets)."""
        counted = state.loss_count - int(state.skipped_since_eval)
        train_loss = (state.loss_sum / counted).item() if counted else math.nan
        state.loss_sum.zero_()
        state.skipped_since_eval.zero_()
        state.loss_count = 0
        return {
            "epoch": state.epoch, "step": state.step, "lr": state.lr, "train_loss": train_loss,
            "skipped_steps": int(state.skipped_steps), "seconds": round(seconds, 3),
        }  # fmt: skip

    def write_row(self, entry: dict) -> None:
        log.info("%s", entry)
        if self.env.rank == 0:
            self.files.append_metrics(entry)

    def run_epoch(self, state: RunState, bar: tqdm, start: float) -> None:
        config, steps = self.config, self.steps_per_epoch
        total = total_steps(config, steps)
        order = batch_order(len(self.examples), config.batch_size, config.seed, state.epoch)
        while state.batch < steps and state.step < total:
            state.lr = lr_at(config, state.step, state.epoch, steps)
            loss, skipped = self.optimizer_step(order[state.batch], state.lr)
            self.count_step(state, loss, skipped)
            state.step += 1
            state.batch += 1
            bar.update(1)
            if state.step % 10 == 0 or state.step == total:  # .item() waits for the GPU: not at every step
                if self.diverged(state):
                    break
                if self.progress:
                    bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{state.lr:.2e}", **self.rates.text(state.step),
                                    refresh=False)  # fmt: skip
            if config.eval_every_steps and state.step % config.eval_every_steps == 0 and state.batch < steps:
                self.record_evaluation(state, time.perf_counter() - start)
                if state.stopped_early:
                    break
            elif self.loss_row_due(state) and state.batch < steps and state.step < total:  # else see below
                self.record_training_loss(state, time.perf_counter() - start)
            if config.checkpoint_every and state.step % config.checkpoint_every == 0 and state.batch < steps:
                state.seconds = time.perf_counter() - start
                self.save(state)
            if state.batch < steps and self.past_deadline():  # mid-epoch: checkpoint here and stop
                state.seconds = time.perf_counter() - start
                self.save(state)
                self.interrupted = True
                return
        if state.batch == steps:
            state.epoch, state.batch = state.epoch + 1, 0
        last = state.step >= total or state.epoch >= config.epochs or self.diverged(state)
        evaluated = bool(state.history) and state.history[-1]["step"] == state.step
        if not evaluated and (last or (state.batch == 0 and state.epoch % config.eval_every == 0)):
            self.record_evaluation(state, time.perf_counter() - start)
        elif not evaluated and state.batch == 0 and self.loss_row_due(state):
            self.record_training_loss(state, time.perf_counter() - start)
        state.done = last or state.stopped_early
        state.seconds = time.perf_counter() - start
        self.save(state)

    def loss_row_due(self, state: RunState) -> bool:
        return bool(self.config.log_every_steps) and state.step % self.config.log_every_steps == 0

    @staticmethod
    def count_step(state: RunState, loss: Tensor, skipped: Tensor) -> None:
        state.loss_sum += torch.where(skipped, 0.0, loss)
        state.loss_count += 1
        state.skipped_since_eval += skipped
        state.skipped_steps += skipped
        state.skipped_in_a_row.mul_(skipped).add_(skipped)  # back to 0 at a good step

    def diverged(self, state: RunState) -> bool:
        """After max_skipped_in_a_row non-finite steps in a row the run ends as diverged, with the weights it had
        before them: the skipped steps changed nothing, so the checkpoint written then holds good weights."""
        if state.diverged:
            return True
        if int(state.skipped_in_a_row) < self.config.max_skipped_in_a_row:
            return False
        log.warning(
            "training stopped at step %d: the last %d steps had a non-finite loss or gradient norm and were "
            "skipped (%d in the whole run); lower the lr, raise warmup_steps or set grad_clip",
            state.step, int(state.skipped_in_a_row), int(state.skipped_steps),
        )  # fmt: skip
        state.diverged = True
        return True

    def past_deadline(self) -> bool:
        """The run was asked to stop, on any rank (a collective under DDP, so every rank stops at the same step)."""
        if self.stop_when is None:
            return False
        late = bool(self.stop_when())
        if self.env.world > 1:
            flag = torch.tensor([float(late)], device=self.env.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            late = bool(flag.item())
        return late

    def result(self, state: RunState) -> TrainResult:
        name, history = self.config.early_stop_metric, state.history
        best = history[-1] if history else {}
        if name is not None and history and all(name in entry for entry in history):
            best = max(history, key=lambda entry: entry[name])  # the first of equals: the earliest
        return TrainResult(
            history, best, state.stopped_early, state.step, state.seconds, finished=state.done,
            diverged=state.diverged, skipped_steps=int(state.skipped_steps),
            cuda_graph=None if self.graphed is None else self.graphed.replaying,
        )  # fmt: skip

    def run(self) -> TrainResult:
        state = self.restore()
        if state.done:
            return self.result(state)
        if self.env.rank == 0:
            rows = sorted(state.history + state.loss_rows, key=lambda entry: entry["step"])  # never two at a step
            self.files.write_start(rows)
        self.wrap()
        state.to(self.env.device)  # losses and skip counters summed on the device: no wait for the GPU
        total = total_steps(self.config, self.steps_per_epoch)
        hide = not self.progress or self.env.rank != 0
        bar = tqdm(total=total, initial=state.step, disable=hide, desc="train", unit="step", dynamic_ncols=True)
        start = time.perf_counter() - state.seconds
        self.rates.restart(state.step)
        self.model.train()
        while not state.done:
            self.run_epoch(state, bar, start)  # saves a checkpoint at every epoch end
            if self.interrupted or (not state.done and self.past_deadline()):
                break
        bar.close()
        return self.result(state)


def _stop_rule(stop_at: float | None, stop_when: Callable[[], bool] | None) -> Callable[[], bool] | None:
    if stop_at is None:
        return stop_when
    if stop_when is None:
        return lambda: time.monotonic() > stop_at
    return lambda: time.monotonic() > stop_at or stop_when()


def train(
    model: nn.Module,
    train_data: Examples | tuple[Tensor, Tensor],
    config: TrainConfig,
    run_dir: str | Path | None = None,
    *,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    progress: bool = True,
    stop_at: float | None = None,
    stop_when: Callable[[], bool] | None = None,
    meter: Meter | None = None,
) -> TrainResult:
    """Train `model` in place on examples: (inputs [N, L], labels [N, L] with -100 where unlabelled) or any
    rebased.train.examples.Examples (such as windows read from token shards).

    With run_dir, the run checkpoints there and resumes from its checkpoint.pt if one exists (a finished run
    is not retrained: its stored result is returned and the model gets its final weights). Under torchrun
    (WORLD_SIZE > 1) the process group is initialised here (gloo on CPU, nccl on CUDA) when not already.
    stop_at (a time.monotonic() value): once it has passed, the run checkpoints after the current optimizer
    step and returns with finished=False; train() again with the same run_dir continues exactly from there
    (how a sweep fits runs longer than one time-boxed call). stop_when() returning True does the same (a
    Ctrl-C the caller caught, say); it is asked after every optimizer step. meter: tokens/s and MFU in the
    progress bar and in each metrics entry.
    """
    torch.set_flush_denormal(True)  # denormal activations made the LM-head backward 50x slower on CPU
    env = _setup_distributed(config)
    engine = None
    try:
        torch.manual_seed(config.seed + env.rank)  # the only seeding: dropout streams differ across ranks
        engine = _Engine(model, train_data, config, run_dir, evaluate, progress, env, _stop_rule(stop_at, stop_when),
                         meter)  # fmt: skip
        result = engine.run()
        if env.owns_group:  # no rank tears its connections down while a peer's last collective is in flight
            dist.barrier()
        return result
    finally:
        if env.owns_group:
            _destroy_group(engine)


def _destroy_group(engine: _Engine | None) -> None:
    """DDP's reducer holds the group and, freed, drops its reference holding the GIL. Were that the last one, the
    group's destructor would wait for gloo's worker threads while one waits for the GIL to free the tensors of a
    finished collective: a deadlock. So the engine lets go of its DDP wrapper first (the collection frees it from
    any reference cycle) and the group's last reference drops in destroy_process_group, which lets go of the GIL."""
    if engine is not None:
        engine.ddp = engine.forward = None
    gc.collect()
    dist.destroy_process_group()
