"""The MQAR benchmark: train and evaluate a grid of runs, resume a stopped sweep, summarise, plot.

A run's score is its best test accuracy over epochs (as the paper reports); a cell (model, d_model, L)
takes the learning rate with the best mean over seeds, and reports that mean and its standard deviation.
results.jsonl holds one line per finished run; a sweep that stops (a time limit, or a StopRequest such as
Ctrl-C) checkpoints the runs still training and resumes by skipping the finished ones and continuing those.
Several sweeps may share an output folder (shards of one grid: sharding.py): results.jsonl is read and
written only under its lock (results_locked), and holds each run once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from rebased import checkpoint
from rebased.config import ModelConfig, mixer_config
from rebased.files import locked
from rebased.mixers import BaseConv
from rebased.model import LanguageModel
from rebased.presets import mqar_model
from rebased.tasks.mqar.data import MQARSplits, make_mqar_splits
from rebased.tasks.mqar.grids import ABLATION_KERNELS, MQARRun
from rebased.train import TrainConfig, train
from rebased.train.evaluate import accuracy_by_slice
from rebased.train.loop import resolve_device
from rebased.train.run_files import CHECKPOINT_FILE

log = logging.getLogger(__name__)
RESULTS_FILE = "results.jsonl"
MICRO_BATCH_TOKENS = 512 * 512  # gradient accumulation keeps a micro-batch at or under this many tokens


def model_config(run: MQARRun) -> ModelConfig:
    """Named mixers use their MQAR preset; the other kernel-ablation names are linear attention with that map."""
    max_len = max((length for length, _ in run.train_mix + run.test_mix), default=run.seq_len)
    positions = max_len if run.position_embeddings else 0
    if run.model in ABLATION_KERNELS and run.model not in ("rebased", "based"):
        cfg = mqar_model("linear_attention", run.d_model, max_len)
        mixer = mixer_config("linear_attention", num_heads=12, feature_dim=16, feature_map=run.model)
        cfg = cfg.replace(mixers={"linear_attention": mixer})
    else:
        cfg = mqar_model(run.model, run.d_model, max_len)
    return cfg.replace(vocab_size=run.vocab_size, max_position_embeddings=positions)


def build_model(run: MQARRun) -> LanguageModel:
    model = LanguageModel(model_config(run))
    if run.shift_conv:
        freeze_previous_token_shift(model.layers[0].mixer)
    return model


def freeze_previous_token_shift(mixer: nn.Module) -> None:
    """A BaseConv, y = conv(u) * (W u + b) + u, made y_t = u_{t-1} + u_t and frozen: the conv's only tap is the
    previous position, the gate is 1 (W = 0, b = 1)."""
    if not isinstance(mixer, BaseConv) or mixer.gated or mixer.cfg.kernel_size < 2:
        raise ValueError(f"shift_conv needs a plain BaseConv of kernel size >= 2 first, got {type(mixer).__name__}")
    with torch.no_grad():
        conv = mixer.conv.conv  # output t reads inputs t - K + 1 .. t with weights [..., 0 .. K - 1]
        conv.weight.zero_()
        conv.weight[:, 0, -2] = 1.0
        conv.bias.zero_()
        mixer.projection.weight.zero_()
        mixer.projection.bias.fill_(1.0)
    mixer.requires_grad_(False)


def check_runs(runs: Sequence[MQARRun]) -> None:
    """ValueError naming the run, before anything is trained, for a run whose task, model or training
    settings would fail later (a model that does not fit its d_model, say)."""
    seen = set()
    for run in runs:
        try:
            run.validate()
            key = (run.model, run.d_model, run.seq_len, run.vocab_size, run.train_mix, run.test_mix)
            if key not in seen:  # one model config per distinct shape: configs validate, modules are not built
                model_config(run)
                seen.add(key)
            train_config(run)
        except ValueError as error:
            raise ValueError(f"run {run.run_id}: {error}") from None


def make_data(run: MQARRun) -> MQARSplits:
    train_mix = run.train_mix or ((run.seq_len, run.num_kv_pairs),)
    test_mix = run.test_mix or train_mix
    share = lambda mix, total: [(length, pairs, total // len(mix)) for length, pairs in mix]  # noqa: E731
    return make_mqar_splits(
        share(train_mix, run.train_examples), share(test_mix, run.test_examples),
        vocab_size=run.vocab_size, seed=run.data_seed,
    )  # fmt: skip


# Sweeps on a GPU capture each training step as a CUDA graph (TrainConfig.cuda_graph): on an H200 that took a
# ReBased d 64 step at L 128 from 11.3 to 2.8 ms and at L 2048 from 89 to 68 ms (with the Triton loss:
# benchmarks/results/h200_mqar/mqar_step.log), and the graphed step passes its GPU tests against the eager one.
GRAPHED_STEPS_ON_GPU = True


def train_config(run: MQARRun, device: str = "auto") -> TrainConfig:
    """The paper's recipe (docs/paper.md): AdamW, weight decay 0.1, cosine decay per epoch, no warmup, early
    stop above 0.99; gradient accumulation keeps a micro-batch within MICRO_BATCH_TOKENS."""
    longest = max([run.seq_len, *(length for length, _ in run.train_mix)])
    accumulation = max(1, math.ceil(run.batch_size * longest / MICRO_BATCH_TOKENS))
    while run.batch_size % accumulation:
        accumulation += 1
    return TrainConfig(
        epochs=run.epochs, batch_size=run.batch_size, grad_accumulation=accumulation, lr=run.lr,
        weight_decay=0.1, schedule="cosine", schedule_unit="epoch", early_stop_metric="accuracy",
        early_stop_threshold=0.99, seed=run.seed, device=device,
        cuda_graph=GRAPHED_STEPS_ON_GPU and resolve_device(device).type == "cuda",
    )  # fmt: skip


def run_one(
    run: MQARRun, data: MQARSplits, run_dir: Path | None = None, *, progress: bool = False,
    stop_at: float | None = None, stop_when: Callable[[], bool] | None = None, device: str = "auto",
) -> dict | None:  # fmt: skip
    """Train and evaluate one run on `device` ("auto": a GPU where there is one); its result line, or None
    when it stopped at stop_at (time.monotonic()) or once stop_when() said so, checkpointed in run_dir, where
    calling it again with the same run_dir resumes it."""
    torch.manual_seed(run.seed)  # the model's initial weights
    model = build_model(run)
    test = data.test
    slices = {s.name: (s.start, s.stop) for s in test.slices}
    config = train_config(run, device)
    device = resolve_device(config.device)
    evaluate = lambda m: accuracy_by_slice(m, test.inputs, test.labels, slices, device=device)  # noqa: E731
    train_data = (data.train.inputs, data.train.labels)
    result = train(
        model, train_data, config, run_dir, evaluate=evaluate, progress=progress, stop_at=stop_at, stop_when=stop_when
    )
    if not result.finished:
        return None
    if run_dir is not None:  # the final weights, loadable by `rebased generate` and the analyses
        checkpoint.save(model, run_dir, extra={"mqar_run": dataclasses.asdict(run)})
    best = result.best
    return {
        "run_id": run.run_id,
        **dataclasses.asdict(run),
        "accuracy": best.get("accuracy", float("nan")),
        "loss": best.get("loss", float("nan")),
        "best_epoch": best.get("epoch"),
        "slices": {k.split("/", 1)[1]: v for k, v in best.items() if k.startswith("accuracy/")},
        "final_accuracy": result.history[-1].get("accuracy") if result.history else None,
        "stopped_early": result.stopped_early,
        "steps": result.steps,
        "params": model.num_params(),
        "state_bytes": model.state_size(run.seq_len).bytes,
        "seconds": result.seconds,  # training time, summed over the calls a resumed run took
        "eval_seconds": round(sum(entry.get("eval_seconds", 0.0) for entry in result.history), 3),  # of those
        "device": device.type,
        "cuda_graph": result.cuda_graph,  # the last call's steps replayed a CUDA graph (None: not asked for)
    }


def load_results(path: Path) -> list[dict]:
    """The result lines of results.jsonl ([] when there is none). A last line without its newline that is
    not JSON is a write cut short (the process was killed mid-line): it is skipped, and its run is trained
    again or read back from its finished checkpoint. Any other line that is not a result is an error."""
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    results = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                log.warning("%s: skipping its last line, cut short: %.60s", path, line)
                continue
            raise ValueError(f"{path}, line {number}: not a JSON result line; repair or delete that line") from None
        if not isinstance(result, dict) or "run_id" not in result:
            raise ValueError(f"{path}, line {number}: a result line needs a run_id; repair or delete that line")
        results.append(result)
    return results


def _repair_tail(path: Path) -> None:
    """Before appending: end results.jsonl with a newline, dropping a last line cut short mid-write, so the
    next line is not glued to it. In place, never by a rename: results_locked's lock lives on this file."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    try:
        json.loads(data[cut:])
    except json.JSONDecodeError:
        os.truncate(path, cut)
        return
    with path.open("ab") as handle:
        handle.write(b"\n")


@contextlib.contextmanager
def results_locked(path: Path) -> Iterator[None]:
    """Within: this process alone reads or writes results.jsonl at `path` (and whatever the holder derives
    from it, such as the summary), among every sweep sharing the folder, on any host.

    Why a lock: shards of a grid append to one file. Appends with O_APPEND do not interleave on a local
    disk, but an NFS client appends by writing at the size it last saw, so two hosts can overwrite each
    other's lines; a sweep starting up could read another's line half-written and cut it as a torn tail;
    two shards writing the summary could each read the results before the other's last line, leaving a
    summary without it. One lock over every read and write settles all three, where per-shard files merged
    on read would settle only the first two. The lock is on results.jsonl itself (only appended to and
    truncated in place) so that no lock file is left in a results folder."""
    with locked(path):
        yield


def append_result(path: Path, result: dict) -> bool:
    """Append one result line to results.jsonl under its lock, after repairing a torn tail; False, writing
    nothing, when the file holds that run already (two processes trained it: a restarted shard whose old
    process still ran, say), so each run has one line."""
    with results_locked(path):
        _repair_tail(path)
        if any(line["run_id"] == result["run_id"] for line in load_results(path)):
            return False
        with path.open("a") as handle:
            handle.write(json.dumps(result) + "\n")
            handle.flush()
            os.fsync(handle.fileno())  # the resume point survives a crash of the host, not only of the process
    return True


def finished_results(runs: Sequence[MQARRun], path: Path) -> list[dict]:
    """stored_results read under results.jsonl's lock; [] when there is no file (and no folder to lock in)."""
    if not path.exists():
        return []
    with results_locked(path):
        return stored_results(runs, path)


def stored_results(runs: Sequence[MQARRun], path: Path) -> list[dict]:
    """The lines of results.jsonl that belong to `runs`. A line with a run's id but other settings (a smoke
    test with --set epochs=1 written to the same folder, say) is an error, not a result to reuse."""
    by_id = {run.run_id: json.loads(json.dumps(dataclasses.asdict(run))) for run in runs}  # tuples as lists
    kept = []
    for result in load_results(path):
        settings = by_id.get(result["run_id"])
        if settings is None:
            continue
        changed = sorted(k for k, v in settings.items() if k in result and result[k] != v)
        if changed:
            theirs = ", ".join(f"{k}={result[k]!r} (now {settings[k]!r})" for k in changed)
            raise ValueError(f"{path} holds {result['run_id']} trained with other settings: {theirs}; use another out")
        kept.append(result)
    return kept


def _data_key(run: MQARRun) -> tuple:
    return (run.seq_len, run.num_kv_pairs, run.vocab_size, run.train_examples, run.test_examples,
            run.train_mix, run.test_mix, run.data_seed)  # fmt: skip


def pending_runs(runs: Sequence[MQARRun], results: Sequence[dict]) -> list[MQARRun]:
    """The runs without a result, in the order a sweep trains them: cheapest first (short L, small d_model),
    so a time-boxed call finishes whole cells of every model before it reaches the long runs. Stable, so
    the grid's order holds within an (L, d_model) pair."""
    done = {r["run_id"] for r in results}
    longest = lambda run: max([run.seq_len, *(length for length, _ in run.train_mix)])  # noqa: E731
    return sorted((run for run in runs if run.run_id not in done), key=lambda run: (longest(run), run.d_model))


class StopRequest:
    """Asks a sweep to stop early, as its time limit does: no run starts once it is set, and every run still
    training stops after its current optimizer step, checkpointed, for the sweep run again to resume. The flag is
    a byte in shared memory: a signal handler may set it (no lock to deadlock on) and worker processes,
    which get it when they start, see it."""

    def __init__(self) -> None:
        self._flag = multiprocessing.get_context("spawn").RawValue("b", 0)

    def set(self) -> None:
        self._flag.value = 1

    def is_set(self) -> bool:
        return bool(self._flag.value)


@dataclass(frozen=True)
class Deadline:
    """When the sweep's runs stop: a time.monotonic() instant (inf: none), or once `stop` is set."""

    instant: float
    stop: StopRequest

    def passed(self) -> bool:
        return self.stop.is_set() or time.monotonic() > self.instant


def interrupt_handler(stop: StopRequest, on_first: Callable[[], None] = lambda: None) -> Callable:
    """A SIGINT handler: the first Ctrl-C sets `stop` (the runs checkpoint and the sweep returns) and calls
    on_first(); a second raises KeyboardInterrupt at once, and a run interrupted that way resumes from its
    last checkpoint (an epoch end)."""
    count = 0

    def handler(signum, frame) -> None:
        nonlocal count
        count += 1
        stop.set()
        if count > 1:
            raise KeyboardInterrupt
        on_first()

    return handler


@contextlib.contextmanager
def stop_on_interrupt(stop: StopRequest, on_first: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Within: Ctrl-C goes to interrupt_handler(stop, on_first) (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, interrupt_handler(stop, on_first))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


_WORKER_STOP: StopRequest | None = None  # the parent's StopRequest, in a worker process


def _start_worker(stop: StopRequest) -> None:
    """A worker's initializer: the parent's StopRequest, and Ctrl-C (which the terminal sends to every
    process of the sweep) handled as in the parent, rather than killing the worker mid-step."""
    global _WORKER_STOP
    _WORKER_STOP = stop
    signal.signal(signal.SIGINT, interrupt_handler(stop))


def _train_in_worker(run: MQARRun, run_dir: Path, threads: int, deadline: float, device: str) -> dict | None:
    """One run in a worker process: its own data (the fast generator takes seconds) and CPU threads.
    time.monotonic() is system-wide on Linux, so the parent's deadline means the same instant here. A run
    handed over after the sweep was stopped returns at once."""
    stop_at = Deadline(deadline, _WORKER_STOP or StopRequest())
    if stop_at.passed():
        return None
    torch.set_num_threads(threads)
    return run_one(run, make_data(run), run_dir, stop_when=stop_at.passed, device=device)


def run_sweep(
    runs: Sequence[MQARRun], out_dir: str | Path, *, workers: int = 1, progress: bool = True,
    time_limit: float | None = None, stop: StopRequest | None = None, device: str = "auto",
    on_result: Callable[[dict, int, int], None] = lambda result, done, total: None,
) -> list[dict]:  # fmt: skip
    """Train every run not yet in out_dir/results.jsonl on `device` and return the results of `runs`.

    Every run is checked first (check_runs), so a bad one fails before anything is trained. Runs go
    cheapest first (by L, then d_model). workers > 1 trains that many runs at once in separate processes
    (worth it where one run leaves the device idle; benchmarks/results/h200_mqar has the measurements).
    With one worker, data is generated once per distinct task. time_limit (seconds) or `stop` (once set):
    start no run, and stop each run still training at its next optimizer step, checkpointed in
    out_dir/runs/RUN_ID; run again, it skips the runs in results.jsonl and resumes the checkpointed ones
    (stopped_runs lists them). An exception in this process or a worker (a failed run, a second Ctrl-C
    under stop_on_interrupt) sets `stop`, so the other workers checkpoint, and is raised once they have.
    Other sweeps may train other runs into out_dir at the same time (shards: sharding.py).
    """
    if workers < 1:
        raise ValueError(f"workers={workers}: must be >= 1")
    check_runs(runs)
    stop = stop or StopRequest()
    deadline = math.inf if time_limit is None else time.monotonic() + time_limit
    stop_at = Deadline(deadline, stop)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file, not a folder for the sweep's results")
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / RESULTS_FILE
    with results_locked(results_path):
        _repair_tail(results_path)
        results = stored_results(runs, results_path)
    todo = pending_runs(runs, results)

    def record(result: dict) -> None:  # one line per finished run: the sweep's resume point
        if not append_result(results_path, result):
            log.warning("%s already holds %s (trained twice); kept the line there", results_path, result["run_id"])
        results.append(result)
        on_result(result, len(results), len(runs))

    if workers == 1:
        data_cache: dict[tuple, MQARSplits] = {}
        for run in todo:
            if stop_at.passed():
                break
            if _data_key(run) not in data_cache:
                data_cache.clear()  # one task's data in memory at a time
                data_cache[_data_key(run)] = make_data(run)
            run_dir = out_dir / "runs" / run.run_id
            data = data_cache[_data_key(run)]
            result = run_one(run, data, run_dir, progress=progress, stop_when=stop_at.passed, device=device)
            if result is not None:
                record(result)
        return results
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked into workers
    bar = tqdm(total=len(todo), desc=f"runs, {workers} at once", unit="run", disable=not progress or not todo)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(stop,)) as pool:
        futures = [
            pool.submit(_train_in_worker, run, out_dir / "runs" / run.run_id, threads, deadline, device) for run in todo
        ]
        try:
            for future in as_completed(futures):
                if future.cancelled():
                    continue
                bar.update(1)
                if (result := future.result()) is not None:
                    record(result)
                if stop_at.passed():  # runs not started yet are dropped; running ones checkpoint
                    for pending in futures:
                        pending.cancel()
        except BaseException:  # Ctrl-C, or a run that failed: the other runs checkpoint and stop
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            bar.close()
    return results


def stopped_runs(runs: Sequence[MQARRun], results: Sequence[dict], out_dir: str | Path) -> list[MQARRun]:
    """The runs without a result that have a checkpoint in out_dir/runs/RUN_ID: the next sweep resumes them."""
    return [
        run for run in pending_runs(runs, results) if (Path(out_dir) / "runs" / run.run_id / CHECKPOINT_FILE).exists()
    ]
