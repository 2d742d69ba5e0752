"""rebased.tasks.lm.train: a tiny language model prepares, trains, resumes, evaluates and saves what generation
needs; bad runs are refused before any work; activation checkpointing changes no gradient."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rebased import checkpoint
from rebased.model import LanguageModel
from rebased.presets import pile_150m, tiny
from rebased.tasks.lm import SAMPLE_DIR
from rebased.tasks.lm.data import PrepareConfig, prepare
from rebased.tasks.lm.evaluate import evaluate_run
from rebased.tasks.lm.shards import TokenShards
from rebased.tasks.lm.train import LMRun, TokenWindows, flops_per_token, load_run, train_lm
from rebased.testing import assert_close


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "shards"
    prepare(SAMPLE_DIR, out, "bytes", PrepareConfig(val_fraction=0.2))
    return out


def tiny_run(shards, **changes) -> LMRun:
    options = dict(data=str(shards), preset="tiny", model={"mixer": "rebased"}, seq_len=32, batch_tokens=128,
                   steps=4, warmup_steps=1, eval_every=2, eval_tokens=256, checkpoint_every=2,
                   device="cpu")  # fmt: skip
    return LMRun(**{**options, **changes})


def test_windows_cut_the_stream_into_next_token_pairs(shards):
    stream = TokenShards(shards, "train")
    windows = TokenWindows(stream, 32)
    assert len(windows) == (len(stream) - 1) // 32
    inputs, labels = windows[torch.tensor([0, 3])]
    assert inputs.shape == labels.shape == (2, 32)
    assert torch.equal(inputs[1], torch.from_numpy(stream.tokens(96, 32).astype("int64")))
    assert torch.equal(labels[:, :-1], inputs[:, 1:])  # labels are the inputs shifted by one


def test_train_resume_evaluate_and_load(shards, tmp_path):
    run = tiny_run(shards)
    result = train_lm(run, tmp_path / "run", progress=False)
    assert result.finished and result.steps == 4
    assert [entry["step"] for entry in result.history] == [2, 4]
    assert all("val_ar_ppl" in entry and entry["tokens_per_s"] > 0 for entry in result.history)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "run.json", "loss.png"):
        assert (tmp_path / "run" / name).is_file(), name
    assert load_run(tmp_path / "run") == run
    again = train_lm(run, tmp_path / "run", progress=False)  # a finished run is not trained again
    assert again.steps == 4 and again.history == result.history
    scores = evaluate_run(tmp_path / "run", shards, max_tokens=320, progress=False)
    assert scores["tokens/all"] == 320 == scores["tokens/ar"] + scores["tokens/other"]
    assert 1.0 < scores["ppl/all"] < 257.0 * 1.5  # a trained model scores below a uniform guess's 257, roughly
    model = checkpoint.load(tmp_path / "run")
    assert model.cfg.vocab_size == 320  # the tokenizer's 257, padded to a multiple of 64


def test_a_killed_run_resumes_to_the_uninterrupted_weights(shards, tmp_path):
    whole = train_lm(tiny_run(shards), tmp_path / "whole", progress=False)
    train_lm(tiny_run(shards, steps=2), tmp_path / "cut", progress=False)  # not the same run: refused below
    with pytest.raises(ValueError, match="another run"):
        train_lm(tiny_run(shards), tmp_path / "cut", progress=False)
    part = tmp_path / "part"
    import rebased.train.loop as loop

    original, calls = loop._Engine.past_deadline, []

    def stop_after_three(self):
        calls.append(1)
        return len(calls) >= 3

    loop._Engine.past_deadline = stop_after_three  # a time limit hit mid-run: checkpoint and return
    try:
        stopped = train_lm(tiny_run(shards), part, progress=False)
    finally:
        loop._Engine.past_deadline = original
    assert not stopped.finished and not (part / "model.safetensors").exists()
    resumed = train_lm(tiny_run(shards), part, progress=False)
    assert resumed.finished and resumed.steps == whole.steps
    a, b = checkpoint.load(tmp_path / "whole"), checkpoint.load(part)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert_close(q, p, rel_rms=0.0, name=name)


def test_bad_runs_are_refused_before_training(shards, tmp_path):
    with pytest.raises(ValueError, match="multiple of seq_len"):
        tiny_run(shards, batch_tokens=100)
    with pytest.raises(ValueError, match="smaller than the tokenizer's 257"):
        train_lm(tiny_run(shards, model={"mixer": "rebased", "vocab_size": 200}), tmp_path / "a", progress=False)
    positions = {"mixer": "rebased", "max_position_embeddings": 16}
    with pytest.raises(ValueError, match="beyond the model's max_position_embeddings"):
        train_lm(tiny_run(shards, model=positions), tmp_path / "b", progress=False)
    no_val = tmp_path / "no-val"
    prepare(SAMPLE_DIR, no_val, "bytes", PrepareConfig(val_fraction=0.0))
    with pytest.raises(ValueError, match="larger --val-fraction"):
        train_lm(tiny_run(no_val), tmp_path / "c", progress=False)
    assert not any((tmp_path / name).exists() for name in "abc")  # nothing written: the same --out works later


def test_evaluation_refuses_shards_of_another_tokenizer(shards, tmp_path):
    train_lm(tiny_run(shards, steps=1, eval_every=1), tmp_path / "run", progress=False)
    other = tmp_path / "other"
    shutil.copytree(shards, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "0" * 64  # as if another tokenizer had written these shards
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="another tokenizer"):
        evaluate_run(tmp_path / "run", other, progress=False)


def test_activation_checkpointing_changes_no_gradient():
    torch.manual_seed(0)
    model = LanguageModel(tiny("rebased", d_model=32, vocab_size=64, n_layers=2))
    ids = torch.randint(0, 64, (2, 24))
    grads = []
    for recompute in (False, True):
        model.zero_grad()
        model.checkpoint_layers = recompute
        model(ids).logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, recomputed in zip(*grads):
        assert_close(recomputed, plain, rel_rms=1e-6)
    calls = []
    hook = model.layers[0].mixer.register_forward_hook(lambda *args: calls.append(1))
    model(ids).sum().backward()
    hook.remove()
    assert len(calls) == 2  # the block's mixer ran again in the backward pass


def test_flops_per_token_counts_matmuls_and_mixers():
    attention = pile_150m("attention")
    model = LanguageModel(attention)
    matmuls = model.num_params(exclude_embeddings=True) + attention.d_model * attention.vocab_size
    assert flops_per_token(attention, 2048) == 3 * (2 * matmuls + 12 * 2 * 2048 * 768)
    rebased = pile_150m("rebased")
    matmuls = LanguageModel(rebased).num_params(exclude_embeddings=True) + 768 * rebased.vocab_size
    assert flops_per_token(rebased, 2048) == 3 * (2 * matmuls + 9 * 4 * 256 * 768)  # 9 ReBased layers, F 256


def test_generate_takes_and_prints_text(shards, tmp_path, capsys):
    from rebased.cli import main
    from rebased.commands.generate import _TextCodec
    from rebased.generate import generate

    train_lm(tiny_run(shards, steps=2), tmp_path / "run", progress=False)
    assert main(["generate", str(tmp_path / "run"), "--prompt", "The", "--max-new-tokens", "6",
                 "--temperature", "0"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    codec = _TextCodec(tmp_path / "run")
    model = checkpoint.load(tmp_path / "run")
    (tokens,) = generate(model, [codec.encode("The")], 6, temperature=0)
    assert codec.encode("The")[0] == 256  # the prompt starts a document, after the end-of-document token
    assert printed.rstrip("\n") == codec.decode(tokens).rstrip("\ufffd")


def test_streamed_text_waits_for_whole_characters(shards):
    from rebased.commands.generate import _TextCodec

    codec = _TextCodec.__new__(_TextCodec)
    from rebased.tasks.lm.tokenizers import load_tokenizer

    codec.tokenizer = load_tokenizer(shards)  # the bytes tokenizer: "é" is two tokens
    text_of = codec.stream()
    assert [text_of(token) for token in "aé!".encode()] == ["a", "", "é", "!"]


def test_training_throughput_benchmark_writes_its_table(tmp_path, capsys):
    from rebased.cli import main

    out = tmp_path / "bench"
    argv = ["bench", "--train", "--preset", "tiny", "--lengths", "32", "--tokens", "128", "--steps", "3"]
    assert main([*argv, "--out", str(out)]) == 0
    rows = json.loads((out / "train.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["rebased", "based", "attention"]
    assert all(r["tokens_per_s"] > 0 and r["batch_tokens"] == 128 for r in rows)
    assert "| attention | 32" in (out / "train.md").read_text()


def test_compare_tabulates_each_runs_scores_and_plots_their_curves(shards, tmp_path, capsys):
    from rebased.cli import main

    runs = [tmp_path / "rebased", tmp_path / "based"]
    for run_dir, mixer in zip(runs, ("rebased", "based")):
        train_lm(tiny_run(shards, model={"mixer": mixer}, log_every=1), run_dir, progress=False)
    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "cmp")]) == 2  # not scored yet
    assert "run `rebased eval` on it first" in capsys.readouterr().err
    for run_dir in runs:
        assert main(["eval", str(run_dir), "--data", str(shards), "--max-tokens", "320", "--device", "cpu"]) == 0
    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "cmp")]) == 0

    summary = (tmp_path / "cmp" / "summary.md").read_text()
    assert (tmp_path / "cmp" / "loss.png").stat().st_size > 0
    assert f"### {shards.name}, split val, windows of 32 tokens (in-domain)" in summary
    for run_dir in runs:
        score = json.loads((run_dir / "eval.json").read_text())[0]
        parameters = sum(p.numel() for p in checkpoint.load(run_dir).parameters())
        assert f"| {run_dir.name} | {score['ppl/all']:.3f} |".replace(" ", "") in summary.replace(" ", "")
        assert f"| {run_dir.name} | {parameters / 1e6:.1f}M | 4 |".replace(" ", "") in summary.replace(" ", "")
