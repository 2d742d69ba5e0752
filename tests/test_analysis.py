"""rebased.analysis and `rebased analyze`: score matrices equal to what the mixers compute, IoU / mass /
entropy on hand-made cases with known answers, save-load invariance, and the command line end to end."""

import dataclasses
import json
import math

import pytest
import torch

from rebased import checkpoint
from rebased.analysis.report import analyze_model, analyze_run, gamma_beta_stats, kernel_floor
from rebased.analysis.scores import capture_mixer_inputs, mixer_output, mixer_scores, score_matrices
from rebased.analysis.similarity import (
    BinarisationRule,
    binarise,
    iou_per_example,
    mass_on_targets,
    mqar_ground_truth,
    parse_rule,
    row_entropy,
)
from rebased.cli import main
from rebased.config import mixer_config
from rebased.model import LanguageModel
from rebased.presets import mqar_model
from rebased.tasks.mqar.data import MQARConfig, generate_mqar
from rebased.tasks.mqar.grids import MQARRun
from rebased.tasks.mqar.sweep import build_model

VOCAB, LENGTH, PAIRS = 64, 32, 4


def tiny_model(mixer: str, d_model: int = 24) -> LanguageModel:
    """A two-layer MQAR model [BaseConv, mixer], float64, with weights large enough that scores are not flat."""
    cfg = mqar_model(mixer, d_model=d_model, seq_len=LENGTH).replace(vocab_size=VOCAB)
    if mixer == "sliding_window":
        cfg = cfg.replace(mixers={mixer: mixer_config(mixer, num_heads=2, window=8)})
    model = LanguageModel(cfg).double().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.endswith(("norm1.weight", "norm2.weight", "norm_f.weight")):
                parameter.add_(0.3 * torch.randn_like(parameter))
    return model


def mqar_examples(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    data = generate_mqar(MQARConfig(LENGTH, PAIRS, n, vocab_size=VOCAB, seed=seed))
    return data.inputs, data.labels


# The score matrix is the mixer's own


@pytest.mark.parametrize("mixer", ["rebased", "based", "attention", "sliding_window"])
def test_scores_reproduce_the_mixer_output(mixer):
    torch.manual_seed(0)
    model = tiny_model(mixer)
    ids, _ = mqar_examples(3)
    _, inputs = capture_mixer_inputs(model, ids, [1])
    layer = model.layers[1].mixer
    scores = mixer_scores(layer, inputs[1])
    expected = layer(inputs[1])
    assert expected.abs().max() > 1e-2  # a test of something, not of zeros
    torch.testing.assert_close(mixer_output(layer, scores), expected, rtol=1e-10, atol=1e-12)
    a = scores.scores  # [B, H, T, T]
    assert a.shape == (3, layer.cfg.num_heads, LENGTH, LENGTH)
    assert (a.triu(1) == 0).all()  # causal
    assert (a >= 0).all()
    # Rows sum to 1 up to eps (1e-12 against ReBased's normaliser, which can be tiny at the first positions).
    torch.testing.assert_close(a.sum(-1), torch.ones_like(a[..., 0]), rtol=0, atol=1e-6)


def test_captured_inputs_are_norm1_of_the_residual_stream():
    torch.manual_seed(1)
    model = tiny_model("rebased")
    ids, _ = mqar_examples(2)
    logits, inputs = capture_mixer_inputs(model, ids, [0, 1])
    torch.testing.assert_close(logits, model(ids))
    x0 = model._embed(ids, 0)
    torch.testing.assert_close(inputs[0], model.layers[0].norm1(x0))
    torch.testing.assert_close(inputs[1], model.layers[1].norm1(model.layers[0](x0)))


# Binarisation, IoU, mass and entropy on hand-made matrices


def hand_made_case():
    """One example, N = 2 pairs (keys at 0, 2; values at 1, 3), T = 8: queries at 4 (key of pair 0), 6 (pair 1)."""
    inputs = torch.tensor([[10, 40, 11, 41, 10, 0, 11, 0]])
    labels = torch.full_like(inputs, -100)
    labels[0, 4], labels[0, 6] = 40, 41
    return inputs, labels


def test_ground_truth_is_the_value_token_of_the_matching_pair():
    inputs, labels = hand_made_case()
    truth = mqar_ground_truth(inputs, labels, 2)
    assert truth.query_positions.tolist() == [[4, 6]]
    assert truth.targets.long().tolist() == [[[0, 1, 0, 0], [0, 0, 0, 1]]]
    assert mqar_ground_truth(inputs, labels, 2, "key").targets.long().tolist() == [[[1, 0, 0, 0], [0, 0, 1, 0]]]
    assert mqar_ground_truth(inputs, labels, 2, "pair").targets.sum().item() == 4


def test_ground_truth_of_generated_examples_points_at_the_label():
    inputs, labels = mqar_examples(5)
    truth = mqar_ground_truth(inputs, labels, PAIRS)
    position = truth.targets.float().argmax(-1)  # [B, Q]: the value position
    assert (inputs.gather(1, position) == labels.gather(1, truth.query_positions)).all()


def test_iou_of_three_queries_two_right_under_top1():
    # 3 queries over C = 6 columns; truth at 1, 3, 5; the scores' maxima at 1, 3 (right) and 0 (wrong).
    inputs = torch.tensor([[5, 40, 6, 41, 7, 42, 5, 0, 6, 0, 7, 0]])
    labels = torch.full_like(inputs, -100)
    labels[0, 6], labels[0, 8], labels[0, 10] = 40, 41, 42
    truth = mqar_ground_truth(inputs, labels, 3)
    scores = torch.zeros(1, 12, 12)
    scores[0, 6, [0, 1]] = torch.tensor([0.2, 0.8])
    scores[0, 8, [1, 3]] = torch.tensor([0.3, 0.7])
    scores[0, 10, [0, 5]] = torch.tensor([0.6, 0.4])
    # Intersection 2, union 3 predicted + 3 true - 2 shared = 4.
    assert iou_per_example(scores, truth, BinarisationRule()).item() == pytest.approx(2 / 4)
    # Top-2 keeps {0, 1}, {1, 3}, {0, 5}: intersection 3, union 6 + 3 - 3 = 6.
    assert iou_per_example(scores, truth, parse_rule("topk:2")).item() == pytest.approx(3 / 6)
    # Threshold 0.5 keeps 1, 3, 0: the same sets as top-1.
    assert iou_per_example(scores, truth, parse_rule("threshold:0.5")).item() == pytest.approx(2 / 4)
    right, elsewhere = mass_on_targets(scores, truth)
    torch.testing.assert_close(right, torch.tensor([[0.8, 0.7, 0.4]], dtype=torch.float64))
    torch.testing.assert_close(elsewhere, torch.tensor([[0.2, 0.3, 0.6]], dtype=torch.float64))
    h = lambda p: -(p * math.log(p) + (1 - p) * math.log(1 - p))  # noqa: E731
    torch.testing.assert_close(row_entropy(scores, truth), torch.tensor([[h(0.8), h(0.7), h(0.4)]]).double())


def test_softmax_forced_onto_the_right_value_scores_iou_one():
    """A score matrix as softmax gives it with huge logits on the right value positions: IoU 1, mass 1,
    entropy 0, under every rule."""
    inputs, labels = mqar_examples(4)
    truth = mqar_ground_truth(inputs, labels, PAIRS)
    logits = torch.zeros(4, LENGTH, LENGTH)
    targets = torch.nn.functional.pad(truth.targets.float(), (0, LENGTH - 2 * PAIRS))  # [B, Q, T]
    logits.scatter_(1, truth.query_positions[..., None].expand(-1, -1, LENGTH), 1e4 * targets)
    causal = torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril()
    scores = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    for rule in ("top1", "topk:1", "threshold:0.5"):
        assert (iou_per_example(scores, truth, parse_rule(rule)) == 1).all()
    right, elsewhere = mass_on_targets(scores, truth)
    assert torch.allclose(right, torch.ones_like(right)) and elsewhere.abs().max() < 1e-12
    assert row_entropy(scores, truth).abs().max() < 1e-9


def test_binarise_rules():
    rows = torch.tensor([[0.1, 0.5, 0.2, 0.2]])
    assert binarise(rows, parse_rule("top1")).tolist() == [[False, True, False, False]]
    assert binarise(rows, parse_rule("topk:9")).all()  # K above the row length keeps everything
    assert binarise(rows, parse_rule("threshold:0.2")).tolist() == [[False, True, True, True]]


@pytest.mark.parametrize("text", ["top2", "topk:0", "topk:x", "topk", "threshold:", "threshold:nan", "top1:3", ""])
def test_bad_rules_are_refused(text):
    with pytest.raises(ValueError, match="expected top1, topk:K"):
        parse_rule(text)


# Kernels, gamma and beta


def test_kernel_floors():
    assert kernel_floor(tiny_model("based").layers[1].mixer)["min_similarity"] == 0.5
    assert kernel_floor(tiny_model("rebased").layers[1].mixer)["min_similarity"] == 0.0
    softmax = kernel_floor(tiny_model("attention").layers[1].mixer)
    assert softmax["min_similarity"] == 0.0 and softmax["attained"] is False


def test_gamma_beta_stats_per_head():
    torch.manual_seed(2)
    model = tiny_model("rebased")
    fmap = model.layers[1].mixer.feature_map
    rows = gamma_beta_stats(model)
    head3 = next(r for r in rows if r["parameter"] == "k_beta" and r["head"] == 3)
    values = fmap.k_norm.bias.detach().view(12, 16)[3]
    assert head3["mean"] == pytest.approx(values.mean().item()) and head3["max"] == pytest.approx(values.max().item())
    assert {r["parameter"] for r in rows} == {"q_gamma", "q_beta", "k_gamma", "k_beta"}
    assert gamma_beta_stats(tiny_model("based")) == []


# The analysis of a model, saved and loaded, and the command line


def test_analysis_is_the_same_after_save_and_load(tmp_path):
    torch.manual_seed(3)
    model = tiny_model("rebased").float()
    inputs, labels = mqar_examples(8)
    before = analyze_model(model, inputs, labels, PAIRS)
    checkpoint.save(model, tmp_path)
    after = analyze_model(checkpoint.load(tmp_path), inputs, labels, PAIRS)
    assert before["layers"] == after["layers"] and before["accuracy"] == after["accuracy"]
    _, scores = score_matrices(model, inputs)
    assert list(scores) == [1] and scores[1].shape == (8, 12, LENGTH, LENGTH)


def saved_run(tmp_path, model: str = "rebased", **extra) -> str:
    run = MQARRun(model=model, d_model=24, seq_len=LENGTH, num_kv_pairs=PAIRS, lr=1e-3, vocab_size=VOCAB,
                  train_examples=64, test_examples=16, batch_size=64)  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path / model
    checkpoint.save(build_model(run), path, extra={"mqar_run": dataclasses.asdict(run), **extra})
    return str(path)


def test_cli_end_to_end(tmp_path, capsys):
    run_dir = saved_run(tmp_path)
    out = tmp_path / "out"
    assert main(["analyze", run_dir, "--examples", "20", "--rule", "topk:2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| layer" in printed and "LinearAttention" in printed and "topk:2" in printed
    result = json.loads((out / "analysis.json").read_text())
    assert result["examples"] == 20 and result["rule"] == "topk:2" and [r["layer"] for r in result["layers"]] == [1]
    assert 0 <= result["layers"][0]["iou"] <= 1 and result["gamma_beta"]
    assert sorted(p.name for p in out.iterdir()) == ["analysis.json", "gamma_beta.png", "last_query.png",
                                                     "score_maps.png"]  # fmt: skip
    # The library gives the same numbers.
    again = analyze_run(run_dir, examples=20, rule="topk:2", out=tmp_path / "again", figures=False)
    assert again["layers"] == result["layers"]


def fails(argv, capsys, *expected):
    assert main(argv) == 2
    err = capsys.readouterr().err
    for piece in expected:
        assert piece in err, f"{piece!r} not in stderr:\n{err}"
    assert "Traceback" not in err


def test_cli_bad_inputs(tmp_path, capsys):
    run_dir = saved_run(tmp_path)
    fails(["analyze", run_dir, "--rule", "top3"], capsys, "argument --rule", "expected top1, topk:K")
    fails(["analyze", run_dir, "--layer", "5"], capsys, "layer 5 is out of range", "2 layers", "[1]")
    fails(["analyze", run_dir, "--layer", "0"], capsys, "layer 0 is a BaseConv", "no score matrix")
    fails(["analyze", run_dir, "--layer", "-1"], capsys, "argument --layer", "must be >= 0")
    fails(["analyze", run_dir, "--examples", "0"], capsys, "argument --examples")
    fails(["analyze", str(tmp_path / "missing")], capsys, "no config.json")
    plain = tmp_path / "plain"
    checkpoint.save(tiny_model("rebased"), plain)
    fails(["analyze", str(plain)], capsys, "no 'mqar_run' section", "not an MQAR run")
    fails(["analyze", saved_run(tmp_path, "mamba")], capsys, "no softmax or linear attention layer")
    assert not (tmp_path / "rebased" / "analysis").exists()  # nothing written by the failed calls
