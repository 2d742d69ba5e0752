"""Sharding a sweep: which of a grid's runs each of N processes trains, so that an existing launcher (a Slurm
array, torchrun, a shell loop over GPUs) spreads one grid over the GPUs of a host and over hosts.

Every process gets the same command, so the same grid, and computes the same split; shards are numbered from
0 (Slurm's --array=0-7, torchrun's RANK, the GPU ids). They share one output folder: results.jsonl takes
their lines under a lock (rebased/tasks/mqar/sweep.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from rebased.tasks.mqar.grids import MQARRun


@dataclass(frozen=True)
class Shard:
    """Shard `index` (0 .. count - 1) of `count`; from_environment: read from RANK / WORLD_SIZE (--shard auto)."""

    index: int
    count: int
    from_environment: bool = False

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def argument(self) -> str:
        """What --shard takes to pick this shard again: `auto` under a launcher, else I/N."""
        return "auto" if self.from_environment else str(self)


def parse_shard(text: str, environ: Mapping[str, str] = os.environ) -> Shard:
    """`I/N` (shard I of N, I from 0 to N - 1) or `auto` (RANK/WORLD_SIZE, as torchrun sets them); ValueError
    saying what is wrong."""
    if text == "auto":
        return shard_from_environment(environ)
    index_text, _, count_text = text.partition("/")
    try:
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise ValueError(f"expected I/N (shard I of N, I from 0 to N - 1) or auto, got {text!r}") from None
    if count < 1:
        raise ValueError(f"{text}: the shard count N must be >= 1")
    if not 0 <= index < count:
        raise ValueError(
            f"{text}: the shard index must be in 0..{count - 1}; shards are numbered from 0 (a Slurm array "
            f"--array=0-{count - 1}, torchrun's RANK)"
        )
    return Shard(index, count)


def shard_from_environment(environ: Mapping[str, str] = os.environ) -> Shard:
    """The shard a launcher's process is: RANK of WORLD_SIZE (torchrun sets both; across hosts RANK is global)."""
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        raise ValueError(
            "auto: RANK and WORLD_SIZE are not set (torchrun sets them); elsewhere give I/N, e.g. "
            "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT"
        )
    try:
        shard = parse_shard(f"{environ['RANK']}/{environ['WORLD_SIZE']}")
    except ValueError as error:
        raise ValueError(f"auto: RANK/WORLD_SIZE {error}") from None
    return dataclasses.replace(shard, from_environment=True)


def estimated_cost(run: MQARRun) -> int:
    """A run's training cost up to a constant factor: tokens trained times d_model. Early stopping makes the
    true cost unknowable beforehand: a guide for spreading the dear runs, not a schedule."""
    mix = run.train_mix or ((run.seq_len, run.num_kv_pairs),)
    tokens_per_epoch = run.train_examples // len(mix) * sum(length for length, _ in mix)
    return run.epochs * tokens_per_epoch * run.d_model


def shard_runs(runs: Sequence[MQARRun], shard: Shard) -> list[MQARRun]:
    """The runs `shard` trains, in grid order. The split depends on the grid alone, not on which runs are
    finished, so a restarted shard takes up the same runs, and every process of a launch computes it alike."""
    owners = assign_shards([estimated_cost(run) for run in runs], shard.count)
    return [run for run, owner in zip(runs, owners) if owner == shard.index]


def assign_shards(costs: Sequence[int], count: int) -> list[int]:
    """Each item's shard, greedily: items dearest first (ties in the given order), each to the shard with the
    least cost so far (ties to the lowest shard). Runs of equal cost are so dealt round-robin, each shard
    gets its share of the dear runs and of the cheap ones, and the totals, which bound the launch's wall
    time, come out within one cheap run of each other where the dear runs allow it."""
    owners = [0] * len(costs)
    loads = [(0, shard) for shard in range(count)]  # a heap: the least loaded shard on top
    for item in sorted(range(len(costs)), key=lambda i: -costs[i]):  # sorted() is stable
        load, shard = heapq.heappop(loads)
        owners[item] = shard
        heapq.heappush(loads, (load + costs[item], shard))
    return owners


def shard_device(environ: Mapping[str, str], gpus: int) -> str:
    """The device a shard trains on. A launcher that starts one process per GPU on each host sets LOCAL_RANK
    and leaves every GPU visible: the process takes GPU LOCAL_RANK (modulo the count: two shards a GPU where
    it starts more processes than there are GPUs). Otherwise "auto": the GPU that CUDA_VISIBLE_DEVICES
    leaves (a shell loop, a Slurm GPU allocation), or the CPU."""
    if gpus > 1 and "LOCAL_RANK" in environ:
        return f"cuda:{int(environ['LOCAL_RANK']) % gpus}"
    return "auto"


@contextlib.contextmanager
def training_alone() -> Iterator[None]:
    """Within: WORLD_SIZE=1 and RANK=0, restored after. A shard trains its own runs, but the training loop
    reads a launcher's WORLD_SIZE as a request to join every rank into one DDP run; this keeps each run in
    its process (and in the worker processes it spawns, which copy the environment)."""
    saved = {name: os.environ.get(name) for name in ("WORLD_SIZE", "RANK")}
    os.environ.update(WORLD_SIZE="1", RANK="0")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
