"""Sharding an MQAR sweep over processes that share one output folder: which runs each shard trains, --shard
on the command line, the lock on results.jsonl, and real concurrent processes (torchrun, racing writers)."""

import collections
import dataclasses
import fcntl
import json
import multiprocessing
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rebased.cli import INTERRUPTED, main
from rebased.tasks.mqar.grids import experiment
from rebased.tasks.mqar.sharding import (
    Shard,
    assign_shards,
    estimated_cost,
    parse_shard,
    shard_device,
    shard_runs,
    training_alone,
)
from rebased.tasks.mqar.sweep import append_result, load_results

ROOT = Path(__file__).resolve().parent.parent


# Which runs a shard trains


@pytest.mark.parametrize("count", [1, 2, 3, 8, 500])
@pytest.mark.parametrize("name", ["quick", "paper-fig1", "paper-ablation", "length-gen"])
def test_shards_are_disjoint_cover_the_grid_and_keep_its_order(name, count):
    runs = experiment(name)
    position = {run.run_id: i for i, run in enumerate(runs)}
    shards = [shard_runs(runs, Shard(i, count)) for i in range(count)]
    ids = [run.run_id for shard in shards for run in shard]
    assert sorted(ids) == sorted(position)  # every run in exactly one shard
    for shard in shards:
        assert [position[run.run_id] for run in shard] == sorted(position[run.run_id] for run in shard)
    assert shards == [shard_runs(runs, Shard(i, count)) for i in range(count)]  # the same split every time


@pytest.mark.parametrize("count", [3, 8, 16])
def test_shards_share_the_work_and_each_gets_dear_and_cheap_runs(count):
    runs = experiment("paper-fig1")  # costs from L 128 at d_model 64 to L 2048 at d_model 512: 128x
    shards = [shard_runs(runs, Shard(i, count)) for i in range(count)]
    totals = [sum(map(estimated_cost, shard)) for shard in shards]
    assert max(totals) <= 1.01 * sum(totals) / count  # measured 1.0013 at 16 shards
    dearest = max(map(estimated_cost, runs))
    for shard in shards:
        assert {run.seq_len for run in shard} == {128, 256, 512, 1024, 2048}
        assert any(estimated_cost(run) == dearest for run in shard)  # 20 such runs: one for each shard
        assert abs(len(shard) - len(runs) / count) <= 0.1 * len(runs) / count


def test_assignment_balances_costs_not_counts():
    assert assign_shards([10, *[1] * 10], 2) == [0, *[1] * 10]  # one dear run weighs as much as ten cheap ones
    assert assign_shards([5, 5, 5, 5, 1, 1, 1, 1], 2) == [0, 1, 0, 1, 0, 1, 0, 1]  # equal costs: round-robin
    assert assign_shards([1, 2, 3], 5) == [2, 1, 0]  # dearest first; shards 3 and 4 get none


def test_estimated_cost_counts_tokens_trained_times_d_model():
    run = experiment("quick")[0]  # 40k examples of L 32, 6 epochs, d_model 64
    assert estimated_cost(run) == 6 * 40_000 * 32 * 64
    mixed = dataclasses.replace(run, train_mix=((16, 2), (32, 4)))  # 20k examples of each length
    assert estimated_cost(mixed) == 6 * 20_000 * (16 + 32) * 64


# --shard on the command line


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8/8", "the shard index must be in 0..7; shards are numbered from 0 (a Slurm array --array=0-7"),
        ("-1/2", "the shard index must be in 0..1"),
        ("0/0", "the shard count N must be >= 1"),
        ("1", "expected I/N (shard I of N, I from 0 to N - 1) or auto, got '1'"),
        ("a/b", "expected I/N"),
        ("1/2/3", "expected I/N"),
        ("", "expected I/N"),
    ],
)
def test_bad_shards_are_refused_before_any_work(text, expected, capsys, tmp_path):
    out = tmp_path / "out"
    assert main(["mqar", f"--shard={text}", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "argument --shard" in err and expected in err and "Traceback" not in err
    assert not out.exists()


def test_shard_auto_needs_a_launchers_rank_and_world_size(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["mqar", "--shard", "auto", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "auto: RANK and WORLD_SIZE are not set (torchrun sets them)" in err
    assert "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT" in err
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["mqar", "--shard", "auto", "--out", str(tmp_path / "out")]) == 2
    assert "auto: RANK/WORLD_SIZE 3/3: the shard index must be in 0..2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_the_shards_runs_given_as_numbers_or_by_the_launcher(capsys, tmp_path, monkeypatch):
    argv = ["mqar", "paper-fig1", "--dry-run", "--out", str(tmp_path)]
    assert main([*argv, "--shard", "1/8"]) == 0
    out = capsys.readouterr().out
    mine = sorted(run.run_id for run in shard_runs(experiment("paper-fig1"), Shard(1, 8)))
    assert f"400 runs, shard 1/8: {len(mine)} of them" in out and f"(0 done, {len(mine)} to train)" in out
    assert sorted(line.strip() for line in out.splitlines() if line.startswith("  ")) == mine
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert parse_shard("auto") == Shard(1, 8, from_environment=True)
    assert main([*argv, "--shard", "auto"]) == 0
    assert capsys.readouterr().out == out


def test_a_shard_takes_its_launchers_gpu_and_trains_outside_its_ddp_group(monkeypatch):
    assert shard_device({}, gpus=8) == "auto"  # a shell loop's CUDA_VISIBLE_DEVICES=i leaves one GPU
    assert shard_device({"LOCAL_RANK": "3"}, gpus=8) == "cuda:3"
    assert shard_device({"LOCAL_RANK": "9"}, gpus=8) == "cuda:1"  # more processes than GPUs: two a GPU
    assert shard_device({"LOCAL_RANK": "0"}, gpus=1) == shard_device({"LOCAL_RANK": "0"}, gpus=0) == "auto"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("RANK", raising=False)
    with training_alone():
        assert (os.environ["WORLD_SIZE"], os.environ["RANK"]) == ("1", "0")
    assert os.environ["WORLD_SIZE"] == "4" and "RANK" not in os.environ


# results.jsonl under its lock


def is_locked(path: Path) -> bool:
    """Whether some open of `path` (in this process or another) holds its flock."""
    with open(path, "a") as other:
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(other, fcntl.LOCK_UN)
        return False


def quick_results(runs) -> list[dict]:
    return [{"run_id": r.run_id, **json.loads(json.dumps(dataclasses.asdict(r))), "accuracy": 0.5} for r in runs]


def watch_the_lock(monkeypatch, results_path: Path) -> list[tuple[str, bool]]:
    """Record, at each read of the results and each plot, whether results.jsonl was locked."""
    import rebased.tasks.mqar.report as report
    import rebased.tasks.mqar.sweep as sweep

    seen = []
    read, plot = sweep.stored_results, report.plot_summary

    def stored_results(*args, **kwargs):
        seen.append(("read", is_locked(results_path)))
        return read(*args, **kwargs)

    def plot_summary(*args, **kwargs):
        seen.append(("plot", is_locked(results_path)))
        return plot(*args, **kwargs)

    monkeypatch.setattr(sweep, "stored_results", stored_results)
    monkeypatch.setattr(report, "plot_summary", plot_summary)
    return seen


def test_the_report_reads_and_writes_under_the_results_lock(capsys, tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in quick_results(experiment("quick"))))
    seen = watch_the_lock(monkeypatch, path)
    assert main(["mqar", "--report", "--out", str(tmp_path)]) == 0
    assert seen == [("read", True), ("plot", True)] and not is_locked(path)
    assert "(complete)" in (tmp_path / "summary.md").read_text()


def test_a_shard_trains_its_runs_then_summarises_every_shards_under_the_lock(capsys, tmp_path, monkeypatch):
    """A stand-in sweep (test_torchrun_shards_share_one_folder trains for real): the command hands it the
    shard's runs, summarises the whole grid's results under the lock, and says how to resume the shard."""
    import rebased.tasks.mqar.sweep as sweep

    runs = experiment("quick")
    mine = shard_runs(runs, Shard(1, 3))
    other_shard = quick_results(shard_runs(runs, Shard(0, 3)))
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in other_shard))
    handed = []

    def one_run_then_stop(runs, out, *, stop, device, on_result, **options):
        handed.append(([r.run_id for r in runs], device))
        result = quick_results(runs[:1])[0]
        append_result(out / "results.jsonl", result)
        stop.set()  # as Ctrl-C does
        return [result]

    monkeypatch.setattr(sweep, "run_sweep", one_run_then_stop)
    seen = watch_the_lock(monkeypatch, path)
    assert main(["mqar", "--out", str(tmp_path), "--shard", "1/3"]) == INTERRUPTED
    assert handed == [([r.run_id for r in mine], "auto")]
    assert seen and all(locked for _, locked in seen) and seen[-1][0] == "plot"
    summary = (tmp_path / "summary.md").read_text()
    assert "3 of 6 runs still to train" in summary and "--shard" not in summary  # the grid's, not the shard's
    err = capsys.readouterr().err
    assert f"finished runs of shard 1/3, in {path}: 1 of 2" in err
    assert f"resume with: rebased mqar quick --out {tmp_path} --shard 1/3" in err


def test_repairing_a_torn_line_keeps_the_file_and_so_its_lock(tmp_path):
    from rebased.files import locked
    from rebased.tasks.mqar.sweep import _repair_tail

    path = tmp_path / "results.jsonl"
    path.write_text('{"run_id": "a"}\n{"run_id": "b", "acc')
    inode = path.stat().st_ino
    with locked(path):
        _repair_tail(path)
        assert is_locked(path)  # a rename would have put an unlocked file in its place
    assert path.stat().st_ino == inode and path.read_text() == '{"run_id": "a"}\n'


ROWS, WRITERS = 100, 4


def append_rows(path: Path, writer: int, start) -> None:
    """A writer process: wait for the others, then append rows every writer appends and rows of its own."""
    start.wait()
    for i in range(ROWS):
        append_result(path, {"run_id": f"shared-{i}", "writer": writer})
        append_result(path, {"run_id": f"own-{writer}-{i}", "writer": writer})


def test_processes_appending_at_once_leave_each_run_once(tmp_path):
    """Four processes append the same 100 runs (as two processes that trained a run both would) and 100 runs
    each of their own, all at once: every line whole, every run once. Without the lock, a writer checks for
    a run between another's check and its append, and the file holds runs twice."""
    path = tmp_path / "results.jsonl"
    context = multiprocessing.get_context("fork")  # torch is imported already: the writers start in ms
    start = context.Barrier(WRITERS)
    writers = [context.Process(target=append_rows, args=(path, w, start)) for w in range(WRITERS)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
        assert writer.exitcode == 0
    counts = collections.Counter(line["run_id"] for line in load_results(path))
    expected = {f"shared-{i}" for i in range(ROWS)} | {f"own-{w}-{i}" for w in range(WRITERS) for i in range(ROWS)}
    assert set(counts) == expected
    assert [run_id for run_id, count in counts.items() if count > 1] == []


# Real launches


TINY = ["--seeds", "3", "--set", "d_model=16", "--set", "seq_len=16", "--set", "num_kv_pairs=2", "--set",
        "vocab_size=32", "--set", "train_examples=128", "--set", "test_examples=32", "--set", "epochs=1", "--set",
        "batch_size=64"]  # fmt: skip


def test_torchrun_shards_share_one_folder(tmp_path, capsys):
    """torchrun starts three processes of `rebased mqar --shard auto` (RANK/WORLD_SIZE, and a process group's
    address, which the shards must not join: the training loop would make one DDP run of them). Each run of
    the grid is trained once, results.jsonl has it once, the summary covers the grid, and a restarted shard
    has nothing left to train."""
    out = tmp_path / "out"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3"]
    command = [*torchrun, "-m", "rebased", "mqar", "quick", *TINY, "--out", str(out), "--shard", "auto"]
    # The three shards share one stdout pipe. Unbuffered, each report line reaches it in one write, but another
    # shard's write can still land before its newline, so the reports are found anywhere, not at line starts.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = experiment("quick", seeds=3, d_model=16, seq_len=16, num_kv_pairs=2, vocab_size=32, train_examples=128,
                      test_examples=32, epochs=1, batch_size=64)  # fmt: skip
    grid = sorted(run.run_id for run in runs)
    trained = re.findall(r"\[\d+/\d+\] (\S+): accuracy", done.stdout)
    assert sorted(trained) == grid  # no run trained by two shards
    assert sorted(line["run_id"] for line in load_results(out / "results.jsonl")) == grid
    assert all(f"shard {i}/3: 3 of them" in done.stdout for i in range(3))
    summary = (out / "summary.md").read_text()
    assert "(complete)" in summary and "pending" not in summary and "mean ± std over 3 seeds" in summary
    for shard in ("0/3", "2/3"):
        assert main(["mqar", "quick", *TINY, "--out", str(out), "--shard", shard, "--dry-run"]) == 0
        assert "(3 done, 0 to train)" in capsys.readouterr().out
