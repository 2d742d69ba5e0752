"""MQAR experiments and the sweep's bookkeeping: grids, validation before training, summaries, plots."""

import dataclasses
import json

import pytest

from rebased.tasks.mqar.grids import EXPERIMENTS, MQARRun, experiment, paper_pairs
from rebased.tasks.mqar.sweep import build_model, load_results, plot_summary, summarise, summary_markdown


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
    assert set(EXPERIMENTS) == {"quick", "paper-fig1", "paper-ablation", "length-gen"}
    assert paper_pairs(128) == 16 and paper_pairs(1024) == 256


def test_models_build_for_every_experiment_name():
    for name in ("rebased", "based", "attention", "square", "gamma_square"):
        model = build_model(MQARRun(name, 24, 64, 8, 1e-3, vocab_size=64))
        assert model.num_params() > 0


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
    from rebased.tasks.mqar.sweep import paper_comparison

    planned = grid(("rebased", "based"), (64,), (256,), (1e-3, 3e-3, 1e-2), (0, 1), pairs=lambda _: 16)
    cells = {c.model: c for c in summarise(fake_results(), planned)}
    assert cells["rebased"].missing == 2 and "2 runs pending" in summary_markdown(list(cells.values()))
    paper = {("rebased", 256): {64: 0.97}, ("based", 256): {64: 0.99}}
    assert paper_comparison(list(cells.values()), paper) == ""  # both cells still have runs to come
    finished = summarise(fake_results())
    table = paper_comparison(finished, paper)
    assert "| rebased | 256 | 64      | 0.950 | 0.97" in table and "-0.020" in table
    assert "| based   | 256 | 64      | 0.750 | 0.99  | -0.240       | differs by more than 0.05 |" in table


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
    assert torch.allclose(model(ids, select=select), model(ids)[select], atol=1e-6)


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
    """A run longer than one time-boxed call: stopped mid-way, then finished by the next call's sweep with
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
