"""rebased.train: learning, the schedule's formula, accumulation = one batch, labelled positions only, early
stop, atomic checkpoints, SIGKILL-then-resume = uninterrupted (bitwise), torchrun DDP = one process."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook
from train_script import TinyLM, accuracy, make_data, make_model

import rebased.train.loop as train_module
from rebased.testing import assert_close
from rebased.train import CHECKPOINT_FILE, METRICS_FILE, TRAIN_CONFIG_FILE, TrainConfig, batch_order, lr_at, train

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "train_script.py"
QUICK = dict(batch_size=16, lr=1e-2, early_stop_metric=None, device="cpu")  # 128 examples: 8 steps an epoch


def run(config: TrainConfig, run_dir=None, model=None, evaluate=None, data=None):
    model = make_model() if model is None else model
    result = train(model, make_data() if data is None else data, config, run_dir, evaluate=evaluate, progress=False)
    return model, result


def record_lrs():
    """Every learning rate the optimizer stepped with, through a global optimizer hook."""
    seen: list[float] = []
    hook = register_optimizer_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    return seen, hook


def assert_same_params(a: torch.nn.Module, b: torch.nn.Module, rel_rms: float) -> None:
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert_close(p, q, rel_rms=rel_rms, name=name)


def script_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_loss_decreases_and_accuracy_rises():
    data = make_data()
    config = TrainConfig(epochs=12, **QUICK)
    _, result = run(config, data=data, evaluate=lambda m: {"accuracy": accuracy(m, data)})
    losses = [entry["train_loss"] for entry in result.history]
    assert len(result.history) == 12 and result.steps == 96
    assert losses[-1] < 0.3 * losses[0], losses
    assert result.history[-1]["accuracy"] > 0.9 > result.history[0]["accuracy"]


def test_bf16_autocast_on_cpu_trains_fp32_weights():
    """Every training forward runs in bf16 (the hidden layer's output dtype), the weights stay fp32, and the
    losses follow the fp32 run's within bf16's rounding (measured 1e-4 relative) without equalling them."""
    model, dtypes = make_model(), []
    model.mix.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    _, result = run(TrainConfig(epochs=2, precision="bf16", **QUICK), model=model)
    _, fp32 = run(TrainConfig(epochs=2, precision="fp32", **QUICK))
    losses = [entry["train_loss"] for entry in result.history]
    fp32_losses = [entry["train_loss"] for entry in fp32.history]
    assert len(dtypes) == 16 and set(dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses == pytest.approx(fp32_losses, rel=1e-2) and losses != fp32_losses
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_schedule_per_step_follows_formula(schedule):
    config = TrainConfig(epochs=3, warmup_steps=4, schedule=schedule, schedule_unit="step", min_lr=1e-4, **QUICK)
    seen, hook = record_lrs()
    try:
        run(config)
    finally:
        hook.remove()
    total, lr, low = 24, config.lr, config.min_lr
    shape = (lambda p: 0.5 * (1 + math.cos(math.pi * p))) if schedule == "cosine" else (lambda p: 1.0)
    expected = [lr * (t + 1) / 4 if t < 4 else low + (lr - low) * shape((t - 4) / (total - 4)) for t in range(total)]
    assert seen == pytest.approx(expected, rel=1e-12, abs=0)
    assert seen[3] == lr and (seen[-1] < lr) == (schedule == "cosine")


def test_schedule_per_epoch_is_constant_within_an_epoch():
    config = TrainConfig(epochs=4, schedule_unit="epoch", **QUICK)  # the MQAR runs: cosine per epoch, no warmup
    seen, hook = record_lrs()
    try:
        _, result = run(config)
    finally:
        hook.remove()
    expected = [0.5 * config.lr * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    assert seen == pytest.approx([lr for lr in expected for _ in range(8)], rel=1e-12, abs=0)
    assert [entry["lr"] for entry in result.history] == pytest.approx(expected, rel=1e-12)
    warm = TrainConfig(epochs=4, warmup_steps=2, schedule_unit="epoch", **QUICK)
    assert [lr_at(warm, 0, e, 8) for e in range(4)] == pytest.approx([5e-3, 1e-2, 1e-2, 5e-3])


def test_grad_accumulation_equals_one_batch():
    one, _ = run(TrainConfig(epochs=1, max_steps=4, **QUICK))
    accumulated, _ = run(TrainConfig(epochs=1, max_steps=4, grad_accumulation=2, **QUICK))
    assert_same_params(accumulated, one, rel_rms=1e-6)
    assert not all(torch.equal(p, q) for p, q in zip(one.parameters(), make_model().parameters()))


def test_loss_counts_only_labelled_positions():
    data = make_data()
    inputs, labels = data
    initial = make_model()
    model, result = run(TrainConfig(epochs=1, max_steps=1, grad_accumulation=2, **QUICK), model=copy.deepcopy(initial))
    batch = batch_order(len(inputs), 16, 0, 0)[0]
    mask = labels[batch] != -100
    halves = (mask[:8].flatten().nonzero().squeeze(1), mask[8:].flatten().nonzero().squeeze(1))
    assert len(model.selections) == 2  # the model was asked for logits at the labelled positions only,
    for got, want in zip(model.selections, halves):  # and at rows' first positions as label-table padding
        assert set(want.tolist()) <= set(got.tolist())
        assert all(position % inputs.shape[1] == 0 for position in set(got.tolist()) - set(want.tolist()))
        assert len(got) == 8 * int((labels != -100).sum(1).max())  # K: the most labels of any example
    expected = F.cross_entropy(initial(inputs[batch])[mask], labels[batch][mask]).item()
    assert result.history[0]["train_loss"] == pytest.approx(expected, rel=1e-6)

    class FullLogits(TinyLM):  # a model without `select`: full logits, then the labelled rows
        def forward(self, ids):
            return super().forward(ids)

    full = FullLogits(torch.Generator().manual_seed(0))
    run(TrainConfig(epochs=1, max_steps=3, **QUICK), model=full)
    selected, _ = run(TrainConfig(epochs=1, max_steps=3, **QUICK))
    assert_same_params(full, selected, rel_rms=1e-6)


def test_early_stop_fires_above_threshold():
    scores = iter([0.5, 0.9, 0.995, 1.0, 1.0])
    config = TrainConfig(epochs=5, batch_size=16, early_stop_metric="accuracy", early_stop_threshold=0.99)
    _, result = run(config, evaluate=lambda m: {"accuracy": next(scores)})
    assert result.stopped_early and result.steps == 24
    assert [entry["accuracy"] for entry in result.history] == [0.5, 0.9, 0.995]
    assert result.best == result.history[-1]
    with pytest.raises(ValueError, match="early_stop_metric"):
        run(TrainConfig(epochs=1, batch_size=16), evaluate=lambda m: {"loss": 1.0})


def test_checkpoints_are_atomic_and_a_finished_run_is_not_retrained(tmp_path, monkeypatch):
    config = TrainConfig(epochs=2, checkpoint_every=3, **QUICK)
    trained, result = run(config, tmp_path, evaluate=lambda m: {"accuracy": 0.5})
    assert sorted(os.listdir(tmp_path)) == sorted([CHECKPOINT_FILE, TRAIN_CONFIG_FILE, METRICS_FILE])  # no temp names
    assert json.loads((tmp_path / TRAIN_CONFIG_FILE).read_text())["checkpoint_every"] == 3
    assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == 2

    seen, hook = record_lrs()
    try:
        again, stored = run(config, tmp_path, evaluate=lambda m: {"accuracy": 0.5})
    finally:
        hook.remove()
    assert seen == [] and stored == result  # not retrained, and the model holds the final weights
    assert_same_params(again, trained, rel_rms=0.0)

    saves, real_save = [], torch.save

    def crash_on_third(obj, f):
        saves.append(1)
        if len(saves) == 3:
            f.write(b"partial")
            raise OSError("disk full")
        real_save(obj, f)

    monkeypatch.setattr(train_module.torch, "save", crash_on_third)
    with pytest.raises(OSError, match="disk full"):
        run(config, tmp_path / "crash")
    assert sorted(os.listdir(tmp_path / "crash")) == sorted([CHECKPOINT_FILE, TRAIN_CONFIG_FILE, METRICS_FILE])
    checkpoint = torch.load(tmp_path / "crash" / CHECKPOINT_FILE, weights_only=True)
    assert checkpoint["state"]["step"] == 6  # the second save survives whole


def test_resume_refuses_other_settings(tmp_path):
    run(TrainConfig(epochs=1, **QUICK), tmp_path)
    with pytest.raises(ValueError, match="lr"):
        run(TrainConfig(epochs=1, **{**QUICK, "lr": 0.5}), tmp_path)


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="batch_size"):
        run(TrainConfig(batch_size=15, grad_accumulation=2))
    with pytest.raises(ValueError, match="batch_size"):
        run(TrainConfig(batch_size=1024))


def launch(run_dir: Path, out: Path, config: dict, *extra: str, prefix=(sys.executable,)) -> subprocess.Popen:
    command = [*prefix, str(SCRIPT), str(run_dir), str(out), "--config", json.dumps(config), *extra]
    return subprocess.Popen(command, env=script_env(), cwd=ROOT, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err


def metrics_without_time(run_dir: Path) -> list[dict]:
    lines = (run_dir / METRICS_FILE).read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "eval_seconds")} for line in lines]


def test_sigkill_then_resume_equals_uninterrupted_run_bitwise(tmp_path):
    config = {"epochs": 5, "batch_size": 16, "lr": 1e-2, "checkpoint_every": 3, "device": "cpu"}
    args = ("--dropout", "0.3", "--eval-sleep", "0.25")  # dropout: the RNG state matters; sleep: time to kill
    whole = launch(tmp_path / "whole", tmp_path / "whole.pt", config, *args)
    killed = launch(tmp_path / "killed", tmp_path / "killed.pt", config, *args)
    checkpoint = tmp_path / "killed" / CHECKPOINT_FILE
    deadline = time.monotonic() + 60
    while not checkpoint.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    state = torch.load(checkpoint, weights_only=True)["state"]
    assert 0 < state["step"] < 40 and not state["done"], state

    finish(launch(tmp_path / "killed", tmp_path / "killed.pt", config, *args))
    finish(whole)
    assert metrics_without_time(tmp_path / "killed") == metrics_without_time(tmp_path / "whole")
    assert len(metrics_without_time(tmp_path / "whole")) == 5
    resumed, uninterrupted = torch.load(tmp_path / "killed.pt"), torch.load(tmp_path / "whole.pt")
    for name, p in uninterrupted["params"].items():
        assert torch.equal(resumed["params"][name], p), name


def test_stop_at_checkpoints_and_the_next_call_resumes_bitwise(tmp_path):
    """A sweep's time-boxed call: past stop_at the run saves and returns unfinished; train() again continues."""
    config = TrainConfig(epochs=3, **QUICK)
    whole = make_model(dropout=0.3)  # dropout: the saved RNG state must carry over
    whole_result = train(whole, make_data(), config, tmp_path / "whole", progress=False)
    cut = train(make_model(dropout=0.3), make_data(), config, tmp_path / "cut", progress=False, stop_at=0.0)
    assert not cut.finished and cut.steps == 1 and whole_result.finished
    resumed = make_model(seed=5, dropout=0.3)  # other initial weights: everything must come from the checkpoint
    result = train(resumed, make_data(), config, tmp_path / "cut", progress=False)
    assert result.finished and result.steps == whole_result.steps == 24
    assert metrics_without_time(tmp_path / "cut") == metrics_without_time(tmp_path / "whole")
    for (name, p), q in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name


def test_loss_rows_fall_between_evaluations_average_their_steps_and_survive_resume(tmp_path):
    config = TrainConfig(epochs=3, log_every_steps=3, **QUICK)  # 8 steps an epoch, evaluated at each end
    score = lambda model: {"accuracy": accuracy(model, make_data())}  # noqa: E731
    train(make_model(), make_data(), config, tmp_path / "whole", evaluate=score, progress=False)
    rows = metrics_without_time(tmp_path / "whole")
    steps = [3, 6, 8, 9, 12, 15, 16, 18, 21, 24]
    assert [row["step"] for row in rows] == steps
    assert ["accuracy" in row for row in rows] == [step % 8 == 0 for step in steps]

    calls = iter(range(100))
    after_11_steps = lambda: next(calls) >= 10  # noqa: E731  (asked once a step)
    cut = train(make_model(), make_data(), config, tmp_path / "cut", evaluate=score, progress=False,
                stop_when=after_11_steps)  # fmt: skip
    assert not cut.finished and cut.steps == 11
    train(make_model(), make_data(), config, tmp_path / "cut", evaluate=score, progress=False)
    assert metrics_without_time(tmp_path / "cut") == rows

    stopped = TrainConfig(epochs=3, log_every_steps=3, max_steps=12, **QUICK)  # its last step is a row's, mid-epoch
    train(make_model(), make_data(), stopped, tmp_path / "stopped", evaluate=score, progress=False)
    assert [row["step"] for row in metrics_without_time(tmp_path / "stopped")] == [3, 6, 8, 9, 12]

    every_step = TrainConfig(epochs=1, log_every_steps=1, **QUICK)
    _, per_epoch = run(TrainConfig(epochs=1, **QUICK), evaluate=score)
    _, per_step = run(every_step, run_dir=tmp_path / "every")
    losses = [row["train_loss"] for row in metrics_without_time(tmp_path / "every")]
    assert len(losses) == 8 and sum(losses) / 8 == pytest.approx(per_epoch.history[-1]["train_loss"], rel=1e-6)


def test_torchrun_two_processes_equal_one_process(tmp_path):
    config = {"epochs": 2, "batch_size": 16, "grad_accumulation": 2, "lr": 1e-2, "checkpoint_every": 5, "device": "cpu"}
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    finish(launch(tmp_path / "ddp", tmp_path / "ddp.pt", config, prefix=torchrun))
    single, result = run(TrainConfig(**{**config, "early_stop_metric": None}))
    ddp = torch.load(tmp_path / "ddp.pt")
    threads = ddp["gloo_threads"]  # the group ends in destroy_process_group, and nothing of it outlives train()
    assert threads["at_destroy"] in ([0], [None]) and threads["after_train"] in (0, None), threads
    for name, p in single.state_dict().items():
        assert_close(ddp["params"][name], p, rel_rms=1e-6, name=name)  # measured 5e-8; a 2x gradient: 2e-5
    assert ddp["result"]["steps"] == result.steps == 16
    ddp_losses = [entry["train_loss"] for entry in ddp["result"]["history"]]
    assert ddp_losses == pytest.approx([entry["train_loss"] for entry in result.history], rel=1e-5)


def test_positions_select_what_the_mask_selects():
    """LanguageModel's select takes a boolean mask or the flat indices train() passes: the same logits."""
    from rebased.model import LanguageModel
    from rebased.presets import tiny
    from rebased.train import labelled_positions

    torch.manual_seed(0)
    model = LanguageModel(tiny("rebased"))
    ids = torch.randint(0, 256, (3, 10))
    labels = torch.where(torch.rand(3, 10) < 0.3, ids, torch.full_like(ids, -100))
    positions, targets = labelled_positions(labels)
    mask = labels != -100
    assert torch.equal(model(ids, select=positions), model(ids, select=mask))
    assert torch.equal(targets, labels[mask])
    assert_close(model(ids)[mask], model(ids, select=positions), rel_rms=1e-6, name="logits")  # (matmul blocking)


def test_cuda_graph_step_says_what_it_needs():
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        run(TrainConfig(epochs=1, cuda_graph=True, **QUICK))


class FakeCapture:
    """The CUDA pieces GraphedStep touches, on the CPU: streams that run in place, a graph whose replay calls
    the captured step again, a generator state to save and put back. `fail_captures` of them raise first."""

    def __init__(self, monkeypatch, fail_captures: int):
        self.fail_captures, self.collector_during_capture, self.graphs = fail_captures, [], 0
        fake = self

        class Graph:
            def replay(self):
                fake.replays += 1

        class GraphContext:
            def __init__(self, graph, stream):
                fake.capture_streams.append(stream)

            def __enter__(self):
                fake.capturing = True

            def __exit__(self, *exc):
                fake.capturing = False
                if fake.fail_captures:
                    fake.fail_captures -= 1
                    raise RuntimeError("operation failed due to a previous error during capture")
                fake.graphs += 1

        class Generator:
            def clone_state(self):
                return "state"

            def graphsafe_set_state(self, state):
                fake.restored = state

        self.capturing, self.replays, self.restored, self.capture_streams = False, 0, None, []
        cuda = torch.cuda
        stream = lambda: types.SimpleNamespace(wait_stream=lambda other: None)  # noqa: E731
        current = stream()
        monkeypatch.setattr(cuda, "Stream", lambda device: stream())
        monkeypatch.setattr(cuda, "stream", lambda stream: contextlib.nullcontext())
        monkeypatch.setattr(cuda, "current_stream", lambda device=None: current)
        monkeypatch.setattr(cuda, "current_device", lambda: 0)
        monkeypatch.setattr(cuda, "default_generators", (Generator(),))
        monkeypatch.setattr(cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(cuda, "graph", GraphContext)

    def step(self, batch, lr):
        if self.capturing:
            self.collector_during_capture.append(gc.isenabled())
        self.steps.append("captured" if self.capturing else "eager")
        return torch.zeros(()), torch.zeros(())


@pytest.mark.parametrize("fail_captures", [0, 1, 2])
def test_graphed_step_retries_a_failed_capture_once_then_trains_eagerly(monkeypatch, caplog, fail_captures):
    """GraphedStep's sequence on stand-ins for the CUDA calls: WARMUP_STEPS eager steps, the capture, replays.
    A failed capture is tried again after WARMUP_STEPS more eager steps; a second failure leaves every later
    step eager, with a warning each time. The capture runs on the warm-up's side stream, the cycle collector is
    off during it and on again after it, and a failed capture puts back the generator's state."""
    from rebased.train.graphed import CAPTURE_ATTEMPTS, WARMUP_STEPS, GraphedStep

    fake = FakeCapture(monkeypatch, fail_captures)
    fake.steps = []
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    graphed = GraphedStep(fake.step, optimizer, torch.device("cpu"))
    batch = types.SimpleNamespace(count=torch.zeros((), dtype=torch.int64), parts=[])
    with caplog.at_level("WARNING", logger="rebased.train.graphed"):
        for _ in range(12):
            graphed(batch, 0.1)
    assert gc.isenabled() and fake.collector_during_capture and not any(fake.collector_during_capture)
    assert fake.capture_streams and all(stream is graphed.side for stream in fake.capture_streams)
    warmup = ["eager"] * WARMUP_STEPS
    if fail_captures == 0:
        assert fake.steps == warmup + ["captured"] and fake.replays == 12 - WARMUP_STEPS
    elif fail_captures < CAPTURE_ATTEMPTS:
        assert fake.steps == warmup + ["captured", "eager"] + warmup + ["captured"]
        assert fake.replays == 12 - 2 * WARMUP_STEPS - 1 and "trying again" in caplog.text
    else:
        rest = ["eager"] * (12 - 2 * (WARMUP_STEPS + 1))
        assert fake.steps == warmup + ["captured", "eager"] + warmup + ["captured", "eager"] + rest
        assert fake.replays == 0 and "so it runs without one" in caplog.text
    assert graphed.replaying == (fail_captures < CAPTURE_ATTEMPTS)
    assert (fake.restored == "state") == (fail_captures > 0)
    assert caplog.text.count("could not be captured") == fail_captures


def mqar_gpu_run(**config_changes):
    """A small MQAR ReBased training set-up on the GPU: (model, (inputs, labels), config)."""
    from rebased.tasks.mqar.grids import MQARRun
    from rebased.tasks.mqar.sweep import build_model, make_data, train_config

    run = MQARRun("rebased", 64, 128, 8, 1e-3, train_examples=512, test_examples=64, batch_size=64)
    data = make_data(run)
    config = dataclasses.replace(train_config(run), early_stop_metric=None, **config_changes)
    torch.manual_seed(0)
    return build_model(run), (data.train.inputs, data.train.labels), config


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("embedding_kernel", [False, True], ids=["torch-embedding", "triton-embedding"])
def test_gpu_graphed_step_trains_as_the_eager_one(tmp_path, monkeypatch, caplog, embedding_kernel):
    """Three eager warm-up steps, the capture, then replays, stopped after 6 steps and resumed without the graph
    to 8: the weights match the eager run's (the same kernels in the same order; bf16 autocast and the kernels'
    atomics leave rounding differences), and the checkpoint holds the optimizer as the eager step keeps it. With
    the token embedding's gradient from the Triton kernel too (its sort and search captured in the graph)."""
    from rebased.ops import embedding
    from rebased.train.graphed import WARMUP_STEPS

    monkeypatch.setattr(embedding, "EMBEDDING_TRITON_ON_GPU", embedding_kernel)
    model, data, config = mqar_gpu_run(max_steps=8)
    graphed = copy.deepcopy(model)
    train(model, data, config, progress=False)
    steps = iter(range(1, 100))
    with caplog.at_level("WARNING", logger="rebased.train.graphed"):
        stopped = train(graphed, data, dataclasses.replace(config, cuda_graph=True), tmp_path, progress=False,
                        stop_when=lambda: next(steps) >= 6)  # fmt: skip
    assert "could not be captured" not in caplog.text  # the replays ran, not the eager fallback
    assert not stopped.finished and stopped.steps == 6 > WARMUP_STEPS + 1 and stopped.cuda_graph is True
    saved = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=False)["optimizer"]["param_groups"]
    assert all(isinstance(g["lr"], float) and not g["capturable"] for g in saved)
    resumed = train(graphed, data, config, tmp_path, progress=False)
    assert resumed.finished and resumed.steps == 8
    for (name, p), q in zip(graphed.state_dict().items(), model.state_dict().values()):
        assert_close(p, q, rel_rms=2e-3, name=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_step_that_cannot_be_captured_trains_on_eagerly(monkeypatch, caplog):
    """A step that waits for the device (here: one extra synchronisation, which a capture refuses) fails its
    capture; training goes on eagerly, with a warning, to the eager run's weights."""
    model, data, config = mqar_gpu_run(max_steps=6)
    graphed = copy.deepcopy(model)
    train(model, data, config, progress=False)
    original = train_module._Engine.compute_step

    def waiting(self, batch, lr):
        torch.cuda.synchronize()
        return original(self, batch, lr)

    monkeypatch.setattr(train_module._Engine, "compute_step", waiting)
    with caplog.at_level("WARNING", logger="rebased.train.graphed"):
        result = train(graphed, data, dataclasses.replace(config, cuda_graph=True), progress=False)
    assert result.steps == 6 and result.cuda_graph is False
    assert "could not be captured" in caplog.text
    for (name, p), q in zip(graphed.state_dict().items(), model.state_dict().values()):
        assert_close(p, q, rel_rms=2e-3, name=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_gpu_training_steps_never_wait_for_the_device(monkeypatch, cuda_graph):
    """After the first step (kernel compiles, cached tables), an optimizer step queues its work without any
    host-device synchronisation, so the host runs ahead of the GPU (an MQAR ReBased model, bf16 autocast). A
    graphed step waits once, to start its capture."""
    from rebased.train.graphed import WARMUP_STEPS

    original, steps = train_module._Engine.optimizer_step, []
    capture = WARMUP_STEPS if cuda_graph else None

    def checked(self, indices, lr):
        torch.cuda.set_sync_debug_mode("error" if steps and len(steps) != capture else "default")
        try:
            return original(self, indices, lr)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            steps.append(lr)

    monkeypatch.setattr(train_module._Engine, "optimizer_step", checked)
    model, data, config = mqar_gpu_run(max_steps=6, cuda_graph=cuda_graph)
    train(model, data, config, progress=False)
    assert len(steps) == 6


def test_fused_loss_trains_as_the_logits_and_cross_entropy(monkeypatch):
    """TrainConfig.fused_loss (the model's head and loss in row chunks) against logits then F.cross_entropy:
    the same weights after a few steps with accumulation."""
    from rebased.model import LanguageModel
    from rebased.presets import tiny

    monkeypatch.setattr("rebased.model.FUSED_LOSS_MIN_LOGITS", 0)  # the fused op even at this size
    torch.manual_seed(0)
    initial = LanguageModel(tiny("rebased"))
    models = {fused: copy.deepcopy(initial) for fused in (True, False)}
    for fused, model in models.items():
        config = TrainConfig(epochs=1, max_steps=4, grad_accumulation=2, fused_loss=fused, **QUICK)
        run(config, model=model, data=make_data())
    for (name, p), q in zip(models[True].state_dict().items(), models[False].state_dict().values()):
        assert_close(p, q, rel_rms=1e-5, name=name)
    assert not torch.equal(models[True].lm_head.weight, initial.lm_head.weight)


def test_accuracy_by_slice_counts_labelled_positions_per_slice():
    """Overall and per-slice accuracy and the mean loss, against the same computed over the whole set at once,
    with batches that split the slices."""
    from rebased.model import LanguageModel
    from rebased.presets import tiny
    from rebased.train.evaluate import accuracy_by_slice

    torch.manual_seed(0)
    model = LanguageModel(tiny("rebased"))
    ids = torch.randint(0, 256, (10, 12))
    logits = model(ids)
    labels = torch.where(torch.rand(10, 12) < 0.4, logits.argmax(-1), torch.randint(0, 256, (10, 12)))
    labels[torch.rand(10, 12) < 0.5] = -100
    labels[3] = -100  # a row without labels
    mask = labels != -100
    right = (logits.argmax(-1) == labels) & mask
    slices = {"first": (0, 4), "rest": (4, 10)}
    metrics = accuracy_by_slice(model, ids, labels, slices, batch_size=3)
    assert metrics["accuracy"] == pytest.approx(right.sum().item() / mask.sum().item())
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits[mask], labels[mask]).item(), rel=1e-5)
    for name, (begin, end) in slices.items():
        expected = right[begin:end].sum().item() / mask[begin:end].sum().item()
        assert metrics[f"accuracy/{name}"] == pytest.approx(expected)
    assert 0 < metrics["accuracy"] < 1
