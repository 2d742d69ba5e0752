"""MQAR experiments and the sweep's bookkeeping: grids, validation before training, summaries, plots."""

import dataclasses
import json

import pytest
import torch

from rebased import checkpoint
from rebased.tasks.mqar.grids import EXPERIMENTS, MQARRun, experiment, paper_pairs
from rebased.tasks.mqar.report import plot_summary, summarise, summary_markdown
from rebased.tasks.mqar.sweep import build_model, load_results
from rebased.testing import assert_close


def test_paper_fig1_grid_matches_the_paper():
    runs = experiment("paper-fig1", seeds=1)
    assert len(runs) == 5 * 4 * 5 * 4  # models x d_model x L x lr
    assert {r.seq_len: r.num_kv_pairs for r in runs} == {128: 16, 256: 64, 512: 128, 1024: 256, 2048: 512}
    assert {r.lr for r in runs} == {5e-4, 1e-3, 3e-3, 1e-2}
    first = runs[0]
    assert (first.vocab_size, first.train_examples, first.test_examples, first.epochs, first.batch_size) == (
        8192, 100_000, 3_000, 64, 512,
    )  # fmt: skip
    assert len({r.run_id for r in runs}) == len(runs)


def test_ablation_grid_has_the_six_kernels():
    runs = experiment("paper-ablation")
    assert {r.model for r in runs} == {"based", "square", "norm_square", "gamma_square", "affine_square", "rebased"}
    assert {r.num_kv_pairs for r in runs} == {32} and {r.seq_len for r in runs} == {256, 2048}
    assert {r.seed for r in runs} == {0, 1}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"seq_len": 63}, "must be even"),
        ({"num_kv_pairs": 20}, "4N must be <= seq_len"),
        ({"vocab_size": 8}, "too small for 4 distinct keys"),
        ({"model": "rebasd"}, "unknown MQAR model 'rebasd'.*did you mean 'rebased'"),
    ],
)
def test_invalid_tasks_fail_before_training(changes, message):
    with pytest.raises(ValueError, match=message):
        experiment("quick", **changes)


def test_unknown_experiment_suggests_a_name():
    with pytest.raises(ValueError, match="did you mean 'quick'"):
        experiment("quik")
    assert set(EXPERIMENTS) == {"quick", "paper-fig1", "paper-ablation", "paper-similarity", "length-gen"}
    assert paper_pairs(128) == 16 and paper_pairs(1024) == 256


def test_models_build_for_every_experiment_name():
    """Hand count at d_model 24, L 64, vocab 64 (the layout of test_model's Table 6 count):

    embeddings 64*24 + positions 64*24 = 3,072; block 1: norms 2*48 + BaseConv (24*24+24) + (24*3+24) = 792;
    final norm 48: shared 3,912. Block 2: norms 96 + the mixer:
      linear attention, 12 heads of 16: q, k 2*24*192 = 9,216; v, out 24*24 each (value head dim 2) = 1,152
        -> 14,376 for based, square and norm_square (no parameters in the map);
        gamma_square + gamma for q and k 2*192 = 14,760; rebased and affine_square + gamma, beta 4*192 = 15,144
      attention, 1 head with biases: qkv 24*72+72, out 24*24+24 = 2,400 -> 6,408
    """
    expected = {
        "based": 14_376, "square": 14_376, "norm_square": 14_376, "gamma_square": 14_760,
        "affine_square": 15_144, "rebased": 15_144, "attention": 6_408,
    }  # fmt: skip
    counts = {name: build_model(MQARRun(name, 24, 64, 8, 1e-3, vocab_size=64)).num_params() for name in expected}
    assert counts == expected


def test_ablation_kernel_model_uses_its_feature_map():
    model = build_model(MQARRun("affine_square", 48, 64, 8, 1e-3, vocab_size=64))
    names = [n for n, _ in model.named_parameters()]
    assert any("q_norm.weight" in n for n in names) and any("q_norm.bias" in n for n in names)


def fake_results():
    rows = []
    for model, acc in (("rebased", 0.9), ("based", 0.7)):
        for lr, bonus in ((1e-3, 0.0), (3e-3, 0.05)):
            for seed, noise in ((0, 0.01), (1, -0.01)):
                run_id = MQARRun(model, 64, 256, 16, lr, seed).run_id
                rows.append(dict(run_id=run_id, model=model, d_model=64, seq_len=256, lr=lr, seed=seed,
                                 accuracy=acc + bonus + noise))  # fmt: skip
    return rows


def test_summary_takes_the_best_lr_per_cell_and_averages_seeds():
    cells = {c.model: c for c in summarise(fake_results())}
    assert cells["rebased"].best_lr == 3e-3 and cells["rebased"].mean == pytest.approx(0.95)
    assert cells["rebased"].std == pytest.approx(0.01414, rel=1e-3) and cells["rebased"].seeds == 2
    table = summary_markdown(list(cells.values()))
    assert "0.950 ± 0.014 (lr 0.003)" in table and "0.750 ± 0.014" in table


def test_summary_marks_cells_with_runs_pending_and_compares_only_finished_cells():
    from rebased.tasks.mqar.grids import grid
    from rebased.tasks.mqar.report import paper_comparison

    planned = grid(("rebased", "based"), (64,), (256,), (1e-3, 3e-3, 1e-2), (0, 1), pairs=lambda _: 16)
    cells = {c.model: c for c in summarise(fake_results(), planned)}
    assert cells["rebased"].missing == 2 and "2 runs pending" in summary_markdown(list(cells.values()))
    paper = {("rebased", 256): {64: 0.97}, ("based", 256): {64: 0.99}}
    assert paper_comparison(list(cells.values()), paper) == ""  # both cells still have runs to come
    finished = summarise(fake_results())
    table = paper_comparison(finished, paper)
    assert "| ReBased | 256 | 64      | 0.950 | 0.97" in table and "-0.020" in table
    assert "| Based   | 256 | 64      | 0.750 | 0.99  | -0.240       | differs by more than 0.05 |" in table


def test_pending_cells_lists_every_cell_with_runs_left_cheapest_first():
    from rebased.tasks.mqar.grids import grid
    from rebased.tasks.mqar.report import pending_cells

    planned = grid(("rebased", "based"), (64, 128), (256, 512), (1e-3, 3e-3, 1e-2), (0, 1), pairs=lambda _: 16)
    table = pending_cells(planned, fake_results(), {("rebased", 512): {64: 0.89}})
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines()[2:]]
    # L 256 d 64: 4 of 6 runs of each model done; the other six cells have none; short L and small d first
    assert [row[:3] for row in rows] == [
        ["ReBased", "256", "64"], ["Based", "256", "64"], ["ReBased", "256", "128"], ["Based", "256", "128"],
        ["ReBased", "512", "64"], ["Based", "512", "64"], ["ReBased", "512", "128"], ["Based", "512", "128"],
    ]  # fmt: skip
    assert [row[3] for row in rows] == ["4 of 6"] * 2 + ["0 of 6"] * 6
    assert [row[4] for row in rows] == [""] * 4 + ["0.89"] + [""] * 3
    finished = [dict(run_id=run.run_id) for run in planned]
    assert pending_cells(planned, finished, {}) == ""


def test_results_file_round_trips_and_plot_is_written(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in fake_results()))
    assert load_results(path) == fake_results()
    plot = plot_summary(summarise(load_results(path)), tmp_path / "accuracy.png")
    assert plot is not None and plot.stat().st_size > 1000


def test_select_gives_the_logits_of_the_selected_positions():
    import torch

    model = build_model(MQARRun("rebased", 24, 64, 8, 1e-3, vocab_size=64)).eval()
    ids = torch.randint(0, 64, (3, 64), generator=torch.Generator().manual_seed(0))
    select = torch.rand(3, 64, generator=torch.Generator().manual_seed(1)) < 0.2
    assert_close(model(ids, select=select), model(ids)[select], rel_rms=1e-6, name="selected logits")


def tiny_runs():
    common = dict(vocab_size=32, train_examples=256, test_examples=64, epochs=1, batch_size=64)
    return [MQARRun(model, 16, 16, 2, 3e-3, **common) for model in ("based", "attention")]


def test_sweep_trains_resumes_and_runs_workers(tmp_path):
    from rebased.checkpoint import load
    from rebased.tasks.mqar.sweep import run_sweep

    seen = []
    results = run_sweep(tiny_runs(), tmp_path / "a", progress=False, on_result=lambda r, done, total: seen.append(r))
    assert [r["model"] for r in results] == ["based", "attention"] and len(seen) == 2
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["steps"] == 4 for r in results)
    assert all(r["cuda_graph"] is None for r in results)  # (no graphs on the CPU)
    assert all(0 < r["eval_seconds"] < r["seconds"] for r in results)  # the evaluations' share of the time
    assert load(tmp_path / "a" / "runs" / results[0]["run_id"]).num_params() == results[0]["params"]
    again = run_sweep(tiny_runs(), tmp_path / "a", progress=False, on_result=lambda *a: seen.append(a))
    assert [r["seconds"] for r in again] == [r["seconds"] for r in results]  # read back, not retrained
    assert len(seen) == 2
    parallel = run_sweep(tiny_runs(), tmp_path / "b", workers=2, progress=False)
    by_id = {r["run_id"]: r for r in parallel}
    for r in results:  # same seeds, same data: the same run in another process (thread counts may differ)
        assert by_id[r["run_id"]]["loss"] == pytest.approx(r["loss"], rel=1e-4)
        assert by_id[r["run_id"]]["steps"] == r["steps"]


def test_length_generalisation_reports_every_test_length(tmp_path):
    from rebased.tasks.mqar.sweep import run_sweep

    run = MQARRun(
        "based", 16, 32, 4, 3e-3, vocab_size=64, train_examples=256, test_examples=96, epochs=1, batch_size=64,
        train_mix=((16, 2), (32, 4)), test_mix=((16, 2), (32, 4), (64, 8)), position_embeddings=False,
    )  # fmt: skip
    assert build_model(run).position_embedding is None  # nothing to outgrow at the longer test lengths
    (result,) = run_sweep([run], tmp_path, progress=False)
    assert set(result["slices"]) == {"L=16,N=2", "L=32,N=4", "L=64,N=8"}


def test_time_limit_stops_between_runs_and_the_next_call_resumes(tmp_path):
    from rebased.tasks.mqar.sweep import run_sweep

    assert run_sweep(tiny_runs(), tmp_path, progress=False, time_limit=0.0) == []
    assert [r["model"] for r in run_sweep(tiny_runs(), tmp_path, progress=False)] == ["based", "attention"]


def test_a_run_stopped_by_the_time_limit_resumes_from_its_checkpoint(tmp_path):
    """A run longer than one time-boxed sweep: stopped mid-way, then finished by running the sweep again, with
    the same result as an uninterrupted run (dropout and all: bitwise on the CPU)."""
    from rebased.tasks.mqar.sweep import make_data, run_one, run_sweep

    run = dataclasses.replace(tiny_runs()[0], epochs=2)
    whole = run_one(run, make_data(run), tmp_path / "whole")
    assert run_one(run, make_data(run), tmp_path / "sweep" / "runs" / run.run_id, stop_at=0.0) is None
    (resumed,) = run_sweep([run], tmp_path / "sweep", progress=False)
    assert resumed["steps"] == whole["steps"] == 8
    assert resumed["loss"] == whole["loss"] and resumed["accuracy"] == whole["accuracy"]


def test_pending_runs_skip_finished_ones_and_go_cheapest_first():
    from rebased.tasks.mqar.grids import grid
    from rebased.tasks.mqar.sweep import pending_runs

    runs = grid(("rebased", "based"), (128, 64), (256, 128), (1e-3,), (0,), pairs=lambda _: 16)
    done = [{"run_id": runs[0].run_id}]  # rebased, L 256, d 128
    order = [(r.seq_len, r.d_model, r.model) for r in pending_runs(runs, done)]
    assert order == [(128, 64, "rebased"), (128, 64, "based"), (128, 128, "rebased"), (128, 128, "based"),
                     (256, 64, "rebased"), (256, 64, "based"), (256, 128, "based")]  # fmt: skip


def test_results_of_the_same_run_id_with_other_settings_are_refused(tmp_path):
    from rebased.tasks.mqar.sweep import run_sweep

    smoke = [dataclasses.replace(run, train_examples=128) for run in tiny_runs()]
    run_sweep(smoke, tmp_path, progress=False)
    with pytest.raises(ValueError, match="train_examples=128 \\(now 256\\)"):
        run_sweep(tiny_runs(), tmp_path, progress=False)


# Display names, one seed, plots


def test_one_seed_shows_no_spread_and_tables_show_display_names_in_order():
    from rebased.tasks.mqar.grids import DISPLAY_NAMES
    from rebased.tasks.mqar.report import summary_caption

    rows = [dict(run_id=f"{m}-s0", model=m, d_model=64, seq_len=32, lr=3e-3, seed=0, accuracy=a)
            for m, a in (("attention", 1.0), ("based", 0.5), ("rebased", 0.9))]  # fmt: skip
    cells = summarise(rows)
    assert [c.text() for c in cells] == ["0.900 (lr 0.003)", "0.500 (lr 0.003)", "1.000 (lr 0.003)"]
    table = summary_markdown(cells)
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == ["ReBased", "Based", "ConvAttention"]
    assert "±" not in table and "one seed" in summary_caption(cells)
    assert "mean ± std over 2 seeds" in summary_caption(summarise(fake_results()))
    assert DISPLAY_NAMES["attention"] == "ConvAttention" and DISPLAY_NAMES["affine_square"] == "(gamma x + beta)^2"


def write_metrics(runs_dir, run_id, steps, accuracy, loss):
    folder = runs_dir / run_id
    folder.mkdir(parents=True)
    lines = [json.dumps({"epoch": i + 1, "step": s, "train_loss": l, "accuracy": a, "loss": l})
             for i, (s, a, l) in enumerate(zip(steps, accuracy, loss))]  # fmt: skip
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def one_cell_results(runs_dir):
    """Three models x two seeds at lr 3e-3 with metrics; one run at a worse lr that the plot must leave out."""
    rows = []
    for m, model in enumerate(("attention", "rebased", "based")):
        for seed in (0, 1):
            run_id = f"{model}-d64-L32-N4-lr0.003-s{seed}"
            steps, accuracy = [100, 200, 300], [0.25, 0.5 + 0.1 * m, 0.9 + 0.01 * seed]
            write_metrics(runs_dir, run_id, steps, accuracy, [3.0, 1.0, 0.1])
            rows.append(dict(run_id=run_id, model=model, d_model=64, seq_len=32, lr=3e-3, seed=seed, accuracy=0.9))
    write_metrics(runs_dir, "rebased-d64-L32-N4-lr0.01-s0", [100], [0.1], [5.0])
    rows.append(dict(run_id="rebased-d64-L32-N4-lr0.01-s0", model="rebased", d_model=64, seq_len=32, lr=1e-2,
                     seed=0, accuracy=0.1))  # fmt: skip
    return rows


def test_one_cell_plots_learning_curves_of_its_best_lr_runs(tmp_path):
    from rebased.tasks.mqar.report import learning_curves, summary_figure

    results = one_cell_results(tmp_path / "runs")
    cells = summarise(results)
    curves = learning_curves(results, cells, tmp_path / "runs")
    assert [(c.model, c.seed) for c in curves] == [(m, s) for m in ("rebased", "based", "attention") for s in (0, 1)]
    assert curves[0].steps == [100, 200, 300] and curves[0].accuracy == [0.25, 0.6, 0.9]
    figure = summary_figure(cells, results, tmp_path / "runs")
    accuracy_ax, loss_ax = figure.axes
    assert accuracy_ax.get_xlabel() == "step" and accuracy_ax.get_ylabel() == "test accuracy"
    lines = {line.get_gid(): line for line in accuracy_ax.get_lines() if line.get_gid()}
    assert sorted(lines) == sorted(f"{m}/s{s}" for m in ("rebased", "based", "attention") for s in (0, 1))
    assert list(lines["based/s1"].get_xdata()) == [100, 200, 300]
    assert list(lines["based/s1"].get_ydata()) == [0.25, 0.7, 0.91]
    assert lines["based/s0"].get_color() == lines["based/s1"].get_color() != lines["rebased/s0"].get_color()
    assert len([line for line in loss_ax.get_lines() if line.get_gid()]) == 6
    legend = [text.get_text() for text in figure.legends[0].get_texts()]
    assert legend == ["ReBased (2 seeds)", "Based (2 seeds)", "ConvAttention (2 seeds)", "early stop (0.99)"]


def test_several_d_models_plot_accuracy_panels_and_one_cell_without_metrics_falls_back(tmp_path):
    from rebased.tasks.mqar.report import summary_figure

    rows = [dict(run_id=f"{m}{d}{length}{s}", model=m, d_model=d, seq_len=length, lr=1e-3, seed=s,
                 accuracy=d / 1000 + length / 10000 + s / 100)
            for m in ("based", "rebased") for d in (64, 128) for length in (128, 256) for s in (0, 1)]  # fmt: skip
    figure = summary_figure(summarise(rows), rows, tmp_path)  # runs_dir given: still the panels
    assert [ax.get_title() for ax in figure.axes] == ["L = 128", "L = 256"]
    assert {ax.get_xlabel() for ax in figure.axes} == {"d_model"}
    lines = {line.get_gid(): line for line in figure.axes[1].get_lines() if line.get_gid()}
    assert sorted(lines) == ["based", "rebased"]
    assert list(lines["rebased"].get_xdata()) == [64, 128]
    assert list(lines["rebased"].get_ydata()) == pytest.approx([0.0896 + 0.005, 0.1536 + 0.005])
    assert [t.get_text() for t in figure.axes[1].get_legend().get_texts()] == ["ReBased", "Based"]
    one_cell = [r for r in rows if r["d_model"] == 64 and r["seq_len"] == 128]
    fallback = summary_figure(summarise(one_cell), one_cell, tmp_path / "no-runs")
    assert [ax.get_xlabel() for ax in fallback.axes] == ["d_model"]
    across_lengths = summary_figure(summarise([r for r in rows if r["d_model"] == 64]))
    assert [ax.get_xlabel() for ax in across_lengths.axes] == ["sequence length L"]


def test_accuracy_panels_show_the_papers_values_and_the_lengths_still_to_train():
    from rebased.tasks.mqar.grids import grid
    from rebased.tasks.mqar.report import summary_figure

    planned = grid(("rebased", "based"), (64, 128), (256, 1024), (1e-3,), (0,), pairs=lambda _: 16)
    rows = [dict(run_id=run.run_id, model=run.model, d_model=run.d_model, seq_len=256, lr=1e-3, seed=0,
                 accuracy=0.9) for run in planned if run.seq_len == 256]  # fmt: skip
    paper = {("rebased", 1024): {64: 0.55, 128: 0.98}, ("based", 256): {64: 0.99}}
    figure = summary_figure(summarise(rows, planned), rows, None, paper, planned)
    assert [ax.get_title() for ax in figure.axes] == ["L = 256", "L = 1024"]  # 1024: nothing finished yet
    short, long = ({line.get_gid(): line for line in ax.get_lines() if line.get_gid()} for ax in figure.axes)
    assert sorted(short) == ["based", "paper/based", "rebased"] and sorted(long) == ["paper/rebased"]
    assert list(long["paper/rebased"].get_xdata()) == [64, 128]
    assert list(long["paper/rebased"].get_ydata()) == [0.55, 0.98]
    assert [t.get_text() for t in figure.axes[-1].get_legend().get_texts()] == ["ReBased", "Based", "paper"]


# Stopping: a StopRequest (Ctrl-C), a results line cut short


def test_stop_request_counts_as_a_passed_deadline_and_ctrl_c_twice_raises():
    import math

    from rebased.tasks.mqar.sweep import Deadline, StopRequest, interrupt_handler

    stop = StopRequest()
    deadline = Deadline(math.inf, stop)
    assert not deadline.passed()
    told = []
    handler = interrupt_handler(stop, lambda: told.append(True))
    handler(2, None)  # the first Ctrl-C: a request, no exception
    assert stop.is_set() and told == [True]
    assert deadline.passed()  # what train() asks at every step
    with pytest.raises(KeyboardInterrupt):
        handler(2, None)


def stop_once_a_run_trains(stop, runs_dir):
    """A thread that sets `stop` once a run has started training (its train_config.json is written)."""
    import threading
    import time

    def wait_then_stop():
        while not list(runs_dir.glob("*/train_config.json")):
            time.sleep(0.02)
        stop.set()

    threading.Thread(target=wait_then_stop, daemon=True).start()


def test_a_stop_request_checkpoints_the_running_run_and_starts_no_other(tmp_path):
    import math

    from rebased.tasks.mqar.sweep import Deadline, StopRequest, make_data, run_one, run_sweep, stopped_runs

    long_runs = [dataclasses.replace(run, epochs=400) for run in tiny_runs()]  # 1,600 steps: running when stopped
    stop = StopRequest()
    stop.set()
    assert run_sweep(long_runs, tmp_path / "a", progress=False, stop=stop) == []
    assert not (tmp_path / "a" / "runs").exists()  # no run started
    stop = StopRequest()
    stop_once_a_run_trains(stop, tmp_path / "b" / "runs")
    assert run_sweep(long_runs, tmp_path / "b", progress=False, stop=stop) == []
    assert stopped_runs(long_runs, [], tmp_path / "b") == long_runs[:1]  # checkpointed mid-way
    assert not (tmp_path / "b" / "runs" / long_runs[1].run_id).exists()  # the next run did not start
    # A run stopped after its first step and resumed by the next sweep equals an uninterrupted run.
    run = dataclasses.replace(tiny_runs()[0], epochs=2)
    whole = run_one(run, make_data(run), tmp_path / "whole")
    stopped = run_one(
        run, make_data(run), tmp_path / "c" / "runs" / run.run_id, stop_when=Deadline(math.inf, stop).passed
    )
    assert stopped is None
    (resumed,) = run_sweep([run], tmp_path / "c", progress=False)
    assert resumed["steps"] == whole["steps"] == 8 and resumed["loss"] == whole["loss"]


def test_a_stop_request_reaches_the_worker_processes(tmp_path):
    """Workers see the parent's flag: a run stops at its next step with a checkpoint, queued runs do not start."""
    from rebased.tasks.mqar.sweep import StopRequest, run_sweep, stopped_runs

    runs = [dataclasses.replace(run, epochs=400) for run in tiny_runs()]
    stop = StopRequest()
    stop_once_a_run_trains(stop, tmp_path / "runs")
    assert run_sweep(runs, tmp_path, workers=2, progress=False, stop=stop) == []
    stopped = stopped_runs(runs, [], tmp_path)
    assert stopped and all((tmp_path / "runs" / r.run_id).exists() == (r in stopped) for r in runs)


def test_a_results_line_cut_short_is_skipped_and_repaired_before_the_next_append(tmp_path):
    from rebased.tasks.mqar.sweep import _repair_tail

    path = tmp_path / "results.jsonl"
    rows = fake_results()[:2]
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:30])
    assert load_results(path) == rows[:1]
    _repair_tail(path)
    assert path.read_text() == json.dumps(rows[0]) + "\n"
    path.write_text(json.dumps(rows[0]))  # complete, only its newline missing: kept
    _repair_tail(path)
    assert load_results(path) == rows[:1] and path.read_text().endswith("}\n")


def test_shift_conv_makes_the_first_layer_a_frozen_previous_token_shift(tmp_path):
    """paper-similarity's first layer: y_t = u_{t-1} + u_t, unchanged by training; the run has its own id."""
    run = dataclasses.replace(tiny_runs()[0], shift_conv=True, epochs=1)
    assert run.run_id.endswith("-shift-lr0.003-s0")
    model = build_model(run)
    mixer = model.layers[0].mixer
    u = torch.randn(2, 9, run.d_model)
    expected = u + torch.nn.functional.pad(u, (0, 0, 1, 0))[:, :-1]  # u_t + u_{t-1}, u_{-1} = 0
    assert_close(mixer(u), expected, rel_rms=1e-6)
    before = {name: p.clone() for name, p in mixer.named_parameters()}
    from rebased.tasks.mqar.sweep import make_data, run_one

    result = run_one(run, make_data(run), tmp_path / run.run_id)
    trained = checkpoint.load(tmp_path / run.run_id)
    assert result["steps"] > 0
    for name, p in trained.layers[0].mixer.named_parameters():
        assert torch.equal(p, before[name]), name
    with pytest.raises(ValueError, match="plain BaseConv"):
        build_model(dataclasses.replace(run, model="mamba"))
    assert {r.model for r in experiment("paper-similarity")} == {"rebased", "based", "attention"}


def test_training_time_adds_up_runs_by_device_and_task_size():
    from rebased.tasks.mqar.report import training_time

    results = [
        {"device": "cuda", "seq_len": 128, "d_model": 64, "seconds": 60.0, "steps": 600, "eval_seconds": 6.0},
        {"device": "cuda", "seq_len": 128, "d_model": 64, "seconds": 180.0, "steps": 1800},  # (no eval_seconds)
        {"device": "cuda", "seq_len": 512, "d_model": 64, "seconds": 3600.0, "steps": 36000, "eval_seconds": 720.0},
        {"device": "cpu", "seq_len": 128, "d_model": 64, "seconds": 36.0, "steps": 100},
        {"seq_len": 128, "d_model": 64},  # a result without timings (written by an older version) is left out
    ]
    rows = training_time(results).splitlines()
    assert "| cpu    | 128 | 64      | 1    | 100   | 0.6       | 360.0     | -          | 0.01      |" in rows
    assert "| cuda   | 128 | 64      | 2    | 2400  | 2.0       | 100.0     | 10% of 1   | 0.07      |" in rows
    assert "| cuda   | 512 | 64      | 1    | 36000 | 60.0      | 100.0     | 20% of 1   | 1.00      |" in rows
    assert rows[-1] == "4 runs, 1.08 run-hours in all."
    assert training_time([]) == ""


def test_dry_run_estimates_come_from_finished_runs_of_the_same_model_and_width():
    from rebased.tasks.mqar.grids import MQARRun
    from rebased.tasks.mqar.report import RECENT_RUNS, estimate_lines

    def result(model, d_model, seq_len, ms_a_step, device="cuda"):
        return {"model": model, "d_model": d_model, "seq_len": seq_len, "device": device, "steps": 1000,
                "seconds": ms_a_step}  # fmt: skip

    # ReBased d 64 at L 512: older runs at 30 ms a step, then the latest RECENT_RUNS at 10, 10, 12 and 20
    results = [result("rebased", 64, 512, 30.0)] * 3 + [result("rebased", 64, 512, ms) for ms in (10, 10, 12, 20)]
    assert RECENT_RUNS == 4
    results += [result("attention", 64, 512, 5.0), result("based", 64, 512, 40.0, device="cpu")]
    pending = [MQARRun("rebased", 64, 512, 128, 1e-3), MQARRun("rebased", 64, 2048, 512, 1e-3),
               MQARRun("attention", 64, 2048, 512, 1e-3), MQARRun("based", 64, 512, 128, 1e-3),
               MQARRun("rebased", 128, 512, 128, 1e-3)]  # fmt: skip
    lines, totals = estimate_lines(pending, results)
    steps = 64 * (100_000 // 512)  # the paper's protocol: 12,480 steps if the run never stops early
    at_512 = 11e-3 * steps / 60  # minutes: the median of the latest four, 11 ms
    assert lines[0].split()[1:] == [f"{at_512:.1f}", "min", "on", "cuda"]
    assert lines[1].split()[1:] == [f"{4 * at_512:.1f}", "min", "on", "cuda", "(from", "L", "512)"]  # linear in L
    assert lines[2].split() == [pending[2].run_id]  # softmax attention is not scaled from another length
    assert lines[3].split()[1:] == [f"{40e-3 * steps / 60:.1f}", "min", "on", "cpu"]
    assert lines[4].split() == [pending[4].run_id]  # another d_model says nothing
    hours = 5 * at_512 / 60
    assert totals == (f"{40e-3 * steps / 3600:.1f} hours on cpu for 1 run, 4 more with no finished run of their "
                      f"model and d_model to go by; {hours:.1f} hours on cuda for 2 runs, 3 more with no finished run "
                      "of their model and d_model to go by")  # fmt: skip
    assert estimate_lines(pending, []) == ([f"  {run.run_id}" for run in pending], "")
