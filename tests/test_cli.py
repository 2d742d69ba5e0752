"""The command line on bad input: exit status 2, one message on stderr that names what is wrong, and
nothing started or changed. No test here trains a model."""

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

from rebased.cli import INTERRUPTED, main
from rebased.tasks.mqar.grids import experiment


def fails(argv, capsys, *expected):
    """Run `rebased argv`; assert exit status 2 and every expected piece in stderr; return (stdout, stderr)."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    for piece in expected:
        assert piece in captured.err, f"{piece!r} not in stderr:\n{captured.err}"
    assert "Traceback" not in captured.err
    return captured.out, captured.err


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")


# rebased bench


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--lengths", "-5"], ["argument --lengths", "every value must be >= 1, got '-5'"]),
        (["--lengths", "256,abc"], ["argument --lengths", "comma-separated integers >= 1", "'256,abc'"]),
        (["--heads", "0"], ["argument --heads", "must be >= 1, got 0"]),
        (["--batch", "0"], ["argument --batch", "must be >= 1, got 0"]),
        (["--head-dim", "0"], ["argument --head-dim", "must be >= 1"]),
        (["--repeats", "0"], ["argument --repeats", "must be >= 1, got 0"]),
        (["--device", "foo"], ["argument --device", "device 'foo': not a device name"]),
        (["--device", "mps"], ["device 'mps': only cpu and cuda are supported"]),
        (["--backends", "torch,cuda"], ["unknown backend 'cuda'", "torch, triton"]),
        (["--feature-map", "relu"], ["feature map 'relu' has no polynomial kernel", "rebased, square"]),
        (["--feature-map", "rebase"], ["unknown feature map 'rebase'", "did you mean 'rebased'"]),
    ],
)
def test_bench_rejects_bad_arguments_before_any_work(argv, expected, capsys):
    out, _ = fails(["bench", *argv], capsys, *expected)
    assert out == ""  # nothing was checked or timed


@no_cuda
def test_bench_on_cuda_without_cuda(capsys):
    fails(["bench", "--device", "cuda"], capsys, "device 'cuda':", "use --device cpu")
    fails(["bench", "--suite"], capsys, "--suite needs a CUDA GPU")


def test_bench_triton_backend_without_cuda_or_interpreter(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fails(["bench", "--backends", "triton"], capsys, "backend 'triton'", "TRITON_INTERPRET=1")


def test_suite_config_rejects_lengths_beyond_its_tokens_and_bad_entries():
    from rebased.bench.gpu_suite import SuiteConfig

    with pytest.raises(ValueError, match="lengths up to 131072 need at least that many tokens"):
        SuiteConfig(lengths=(1024, 131072))
    with pytest.raises(ValueError, match="entry 'chunk-triton': expected MODE/BACKEND"):
        SuiteConfig(entries=("chunk-triton",))


def test_suite_saves_each_row_as_it_is_timed(monkeypatch, tmp_path):
    """A suite cut short (a device call's time limit) leaves bench.md with the rows timed so far, marked partial."""
    from rebased.bench import gpu_suite
    from rebased.commands import bench

    def fake_time_suite(config, progress, on_row):
        rows = [gpu_suite.SuiteRow("chunk/triton", 1024, 1.5, 4.25, 10.0, 20.0)]
        on_row(rows)
        rows.append(gpu_suite.SuiteRow("chunk/triton", 2048, math.nan, math.nan, math.nan, math.nan, "skipped"))
        on_row(rows)
        raise KeyboardInterrupt  # what timeout's SIGTERM or a Ctrl-C leaves

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "_header", lambda config: "# suite header")
    monkeypatch.setattr(bench, "_check_section", lambda check, checks: "checks")
    monkeypatch.setattr("rebased.bench.ops.check_modes", lambda config: [])
    monkeypatch.setattr(gpu_suite, "time_suite", fake_time_suite)
    argv = ["bench", "--suite", "--lengths", "1024,2048", "--tokens", "4096", "--out", str(tmp_path)]
    assert main(argv) == INTERRUPTED
    text = (tmp_path / "bench.md").read_text()
    assert text.startswith("# suite header\nchecks\n")
    assert "partial: the suite was still running after these 2 rows" in text
    assert re.search(r"\| chunk/triton +\| 1024 +\| 1\.5 +\| 4\.25 ", text), text
    assert "| skipped |" in text.replace("  ", " ")


def test_time_suite_hands_over_every_row_including_skipped_ones(monkeypatch):
    from rebased.bench import gpu_suite

    monkeypatch.setattr(gpu_suite, "_suite_inputs", lambda *args: None)
    monkeypatch.setattr(gpu_suite, "_time_entry", lambda name, fn, inputs, length: gpu_suite.SuiteRow(
        name, length, 1.0, 2.0, 3.0, 4.0))  # fmt: skip
    config = gpu_suite.SuiteConfig(tokens=4096, lengths=(1024, 4096), entries=("chunk/torch", "parallel/torch"),
                                   peers=False, max_scores_bytes=1e9)  # fmt: skip
    seen = []
    rows = gpu_suite.time_suite(config, on_row=lambda so_far: seen.append([(r.name, r.length) for r in so_far]))
    assert [len(s) for s in seen] == [1, 2, 3, 4]
    assert seen[-1] == [(r.name, r.length) for r in rows]
    # parallel/torch at T 4096 would hold 4 x 4096 tokens x 4096 x 16 heads bytes of scores, over 1e9
    assert [r.note for r in rows] == ["", "", "", "skipped: T^2 memory"]


# rebased mqar: arguments


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--workers", "0"], ["argument --workers", "must be >= 1, got 0"]),
        (["--seeds", "0"], ["argument --seeds", "must be >= 1, got 0"]),
        (["--time-limit", "0"], ["argument --time-limit", "must be > 0"]),
        (["--lengths", "abc"], ["argument --lengths", "comma-separated integers"]),
        (["--set", "epochs=abc"], ["--set 'epochs=abc': epochs takes an integer, got 'abc'"]),
        (["--set", "lr=fast"], ["--set 'lr=fast': lr takes a number, got 'fast'"]),
        (["--set", "position_embeddings=maybe"], ["position_embeddings takes true or false"]),
        (["--set", "train_mix=64"], ["train_mix takes L:N pairs, e.g. 64:8,128:16, got '64'"]),
        (["--set", "epoch=3"], ["unknown field 'epoch'", "did you mean 'epochs'"]),
        (["--set", "epochs"], ["--set 'epochs': expected epochs=VALUE"]),
        (["--set", "epochs=0"], ["run rebased-d64-L32-N4-lr0.003-s0: epochs=0: must be >= 1"]),
        (["--set", "seq_len=14"], ["num_kv_pairs=4: 4N must be <= seq_len=14", "at most 3 pairs fit"]),
        (["--set", "seq_len=33"], ["seq_len=33: must be even"]),
        (["--set", "train_examples=10"], ["train_examples=10: fewer than one batch (batch_size=64)"]),
        (["--set", "d_model=1"], ["run rebased-d1-", "num_heads=12: must be in [1, d_model=1]"]),
        (["--set", "model=mamba2"], ["unknown MQAR model 'mamba2'", "did you mean 'mamba'"]),
        (
            ["--models", "rebased,foo"],
            ["--models rebased,foo: foo not in experiment 'quick'", "attention (ConvAttention)"],
        ),
        (["--models", "ConvAttention"], ["'ConvAttention' is 'attention' on the command line"]),
        (["--lengths", "64"], ["--lengths 64: 64 not in experiment 'quick', which has 32"]),
        (["--d-models", "64,128"], ["--d-models 64,128: 128 not in experiment 'quick'"]),
        (["quik"], ["unknown experiment 'quik'", "did you mean 'quick'"]),
    ],
)
def test_mqar_rejects_bad_arguments_before_any_work(argv, expected, capsys, tmp_path):
    out = tmp_path / "out"
    fails(["mqar", *argv, "--out", str(out), "--dry-run"], capsys, *expected)  # (a missed check trains nothing)
    assert not out.exists()


def test_mqar_lengths_that_do_not_fit_the_pairs_of_a_paper_grid(capsys, tmp_path):
    fails(["mqar", "paper-fig1", "--set", "seq_len=64", "--out", str(tmp_path / "x"), "--dry-run"], capsys,
          "num_kv_pairs=64: 4N must be <= seq_len=64", "at most 16 pairs fit")  # fmt: skip


def quick_results(accuracy=0.9, **changes):
    """results.jsonl lines for the quick grid's runs, as the sweep writes them (no training)."""
    runs = experiment("quick", **changes)
    fields = {"accuracy": accuracy, "seconds": 1.0, "steps": 10}
    return [{"run_id": r.run_id, **json.loads(json.dumps(dataclasses.asdict(r))), **fields} for r in runs]


def write_results(path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text)
    return text


def test_mqar_report_on_a_folder_without_results(capsys, tmp_path):
    fails(["mqar", "--report", "--out", str(tmp_path)], capsys,
          f"--report: no results.jsonl in {tmp_path}", f"train with `rebased mqar quick --out {tmp_path}`")  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_mqar_report_on_results_of_other_runs(capsys, tmp_path):
    text = write_results(tmp_path / "results.jsonl", quick_results(epochs=2))
    fails(["mqar", "--report", "--out", str(tmp_path)], capsys, "epochs=2 (now 6)", "use another out")
    write_results(tmp_path / "results.jsonl", [dict(r, run_id="other-" + r["run_id"]) for r in quick_results()])
    fails(["mqar", "--report", "--out", str(tmp_path)], capsys, "holds none of these 6 runs")
    assert text  # the folder's results were not rewritten by the failed calls
    assert not (tmp_path / "summary.md").exists()


def test_mqar_refuses_a_results_file_with_a_broken_line_and_keeps_it(capsys, tmp_path):
    rows = quick_results()
    path = tmp_path / "results.jsonl"
    text = json.dumps(rows[0]) + "\n{not json\n" + json.dumps(rows[1]) + "\n"
    path.write_text(text)
    fails(["mqar", "--out", str(tmp_path)], capsys, "results.jsonl, line 2: not a JSON result line")
    assert path.read_text() == text


def test_mqar_out_that_is_a_file(capsys, tmp_path):
    (tmp_path / "f").write_text("mine")
    fails(["mqar", "--out", str(tmp_path / "f")], capsys, "a file, not a folder")
    assert (tmp_path / "f").read_text() == "mine"


def test_mqar_report_writes_display_names_and_no_spread_for_one_seed(capsys, tmp_path):
    write_results(tmp_path / "results.jsonl", quick_results(seeds=1))
    assert main(["mqar", "--seeds", "1", "--report", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    summary = (tmp_path / "summary.md").read_text()
    for text in (out, summary):
        assert "| ReBased       | 32 | 0.900 (lr 0.003) |" in text and "| ConvAttention |" in text
        assert "±" not in text and "| rebased" not in text
    assert f"Command: `rebased mqar quick --out {tmp_path} --seeds 1`" in summary
    assert "ConvAttention = `attention`" in summary and "one seed" in summary
    assert (tmp_path / "accuracy.png").stat().st_size > 1000


def test_summary_refers_to_nothing_outside_the_repository(capsys, tmp_path):
    """The paper comparison cites docs/paper.md; every file the summary names is one the repository holds."""
    runs = [r for r in experiment("paper-fig1") if r.model == "rebased" and r.seq_len == 128]
    rows = [{"run_id": r.run_id, **json.loads(json.dumps(dataclasses.asdict(r))), "accuracy": 0.99} for r in runs]
    write_results(tmp_path / "results.jsonl", rows)
    argv = ["mqar", "paper-fig1", "--models", "rebased", "--lengths", "128", "--report", "--out", str(tmp_path)]
    assert main(argv) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "docs/paper.md" in summary and "| ReBased | 128 | 64      | 0.990 | 1.00" in summary
    root = Path(__file__).resolve().parent.parent
    named = set(re.findall(r"[\w./-]+\.md\b", summary)) - {"summary.md"}
    assert named and all((root / name).is_file() for name in named), named


# rebased mqar: Ctrl-C


def test_mqar_ctrl_c_says_where_the_runs_are_and_how_to_resume(capsys, tmp_path, monkeypatch):
    """What the command prints when the sweep returns stopped by Ctrl-C (a stand-in sweep: one result,
    one run checkpointed; test_mqar_sweep tests that the real sweep stops and checkpoints)."""
    import rebased.tasks.mqar.sweep as sweep

    def stopped_sweep(runs, out, *, stop, on_result, **options):
        result = quick_results()[0]
        write_results(out / "results.jsonl", [result])
        on_result(result, 1, len(runs))
        (out / "runs" / runs[1].run_id).mkdir(parents=True)
        (out / "runs" / runs[1].run_id / "checkpoint.pt").write_bytes(b"")
        stop.set()  # as the first Ctrl-C does
        return [result]

    monkeypatch.setattr(sweep, "run_sweep", stopped_sweep)
    out = tmp_path / "o"
    assert main(["mqar", "--out", str(out), "--workers", "2"]) == INTERRUPTED
    err = capsys.readouterr().err
    assert "stopped by Ctrl-C" in err
    assert f"finished runs, in {out / 'results.jsonl'}: 1 of 6" in err
    assert f"checkpointed, to continue from {out / 'runs'}/RUN_ID/checkpoint.pt: rebased-d64-L32-N4-lr0.003-s1" in err
    assert "not started: 4" in err
    assert f"resume with: rebased mqar quick --out {out} --workers 2" in err
    assert (out / "summary.md").exists()  # the finished run is summarised as usual


def test_mqar_second_ctrl_c_quits_and_still_says_how_to_resume(capsys, tmp_path, monkeypatch):
    import rebased.tasks.mqar.sweep as sweep

    def interrupted(*args, **options):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "run_sweep", interrupted)
    assert main(["mqar", "--out", str(tmp_path), "--set", "epochs=2"]) == INTERRUPTED
    err = capsys.readouterr().err
    assert "quit at once (second Ctrl-C)" in err and "finished runs, in" in err
    assert f"resume with: rebased mqar quick --out {tmp_path} --set epochs=2" in err


# rebased generate


@pytest.fixture
def saved_model(tmp_path):
    from rebased.checkpoint import save
    from rebased.model import LanguageModel
    from rebased.presets import tiny

    model = LanguageModel(tiny("rebased").replace(max_position_embeddings=16))
    save(model, tmp_path)
    return tmp_path, model.cfg.vocab_size


def test_generate_rejects_bad_tokens_and_lengths_before_printing(saved_model, capsys):
    run_dir, vocab = saved_model
    fails(["generate", str(run_dir), "--prompt", f"1 {vocab}"], capsys,
          f"token ids [{vocab}] are outside the model's vocabulary [0, {vocab})")  # fmt: skip
    fails(["generate", str(run_dir), "--prompt", "1 2", "--stop", "-1"], capsys, "token ids [-1] are outside")
    fails(["generate", str(run_dir), "--prompt", "1 2", "--max-new-tokens", "16"], capsys,
          "a 2-token prompt and --max-new-tokens 16 go past the model's 16 learned positions",
          "ask for at most 15 new tokens")  # fmt: skip
    fails(["generate", str(run_dir), "--prompt", "1", "--stop", "x"], capsys, "argument --stop", "token ids")
    assert capsys.readouterr().out == ""


@no_cuda
def test_generate_on_cuda_without_cuda(saved_model, capsys):
    fails(["generate", str(saved_model[0]), "--prompt", "1", "--device", "cuda"], capsys, "device 'cuda':")


# library: the feature map's inputs


@pytest.mark.parametrize(
    ("name", "heads", "shape", "expected"),
    [
        ("rebased", 12, (2, 5, 12, 8), "takes q [..., 12, 16] (heads, head dim), got q of shape [2, 5, 12, 8]"),
        ("rebased", 12, (2, 5, 4, 16), "takes q [..., 12, 16] (heads, head dim), got q of shape [2, 5, 4, 16]"),
        ("taylor", 12, (2, 5, 12, 8), "takes q [..., 16] (heads, head dim), got q of shape [2, 5, 12, 8]"),
        ("hedgehog", 12, (2, 5, 3, 16), "takes q [..., 12, 16]"),
        ("performer", 1, (2, 5, 1, 4), "got q of shape [2, 5, 1, 4]"),
    ],
)
def test_feature_map_names_the_dims_it_expects(name, heads, shape, expected):
    from rebased.feature_maps import make_feature_map

    fmap = make_feature_map(name, 16, heads)
    with pytest.raises(ValueError, match=f"head_dim=16, num_heads={heads}") as error:
        fmap.prepare(torch.randn(shape), torch.randn(shape))
    assert expected in str(error.value)


def test_feature_map_checks_k_too_and_per_head_maps_take_any_head_count():
    from rebased.feature_maps import make_feature_map

    fmap = make_feature_map("rebased", 16, 12)
    with pytest.raises(ValueError, match=r"got k of shape \[1, 3, 12, 4\]"):
        fmap.prepare(torch.randn(1, 3, 12, 16), torch.randn(1, 3, 12, 4))
    per_head = make_feature_map("rebased", 16, 12, scope="per_head")  # one norm per head, shared by all heads
    q, k = per_head.prepare(torch.randn(1, 3, 5, 16), torch.randn(1, 3, 5, 16))
    assert q.shape == (1, 3, 5, 16)


def test_mqar_lrs_keeps_the_runs_of_those_learning_rates(capsys, tmp_path):
    argv = ["mqar", "paper-similarity", "--lrs", "0.001", "--dry-run", "--out", str(tmp_path / "sim")]
    assert main(argv) == 0
    listed = [line.strip() for line in capsys.readouterr().out.splitlines() if "-lr" in line]
    assert listed == [f"{m}-d128-L128-N32-shift-lr0.001-s0" for m in ("rebased", "based", "attention")]
    assert main(["mqar", "paper-similarity", "--lrs", "0.002", "--dry-run", "--out", str(tmp_path / "x")]) == 2
    assert "0.002 not in experiment 'paper-similarity'" in capsys.readouterr().err
