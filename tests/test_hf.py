"""rebased.hf: the models through Hugging Face transformers. Saved and loaded weights give the same logits,
greedy generate() equals rebased.generate token for token through the recurrent state, the loss equals the
project's, padded batches score right or fail clearly, and a `rebased train` run exports to a folder that
AutoModelForCausalLM and AutoTokenizer load (also with trust_remote_code and nothing imported)."""

from __future__ import annotations

import ast
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the transformers interface is an optional extra: pip install '.[hf]'")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import rebased  # noqa: E402
from rebased import checkpoint  # noqa: E402
from rebased.cli import main  # noqa: E402
from rebased.generate import generate  # noqa: E402
from rebased.hf import RebasedForCausalLM, RecurrentCache  # noqa: E402
from rebased.hf.modeling import CACHE_FIELD  # noqa: E402
from rebased.model import LanguageModel  # noqa: E402
from rebased.presets import tiny, tiny_hybrid  # noqa: E402
from rebased.tasks.lm.evaluate import evaluate_perplexity  # noqa: E402
from rebased.tasks.lm.tokenizers import EOS_TEXT, load_tokenizer  # noqa: E402
from rebased.testing import assert_close  # noqa: E402

# hybrid: based_360m's layout (gated convs, Based, sliding-window attention, RMSNorm) at CPU size
KINDS = {"rebased": lambda: tiny("rebased"), "based": lambda: tiny("based"), "attention": lambda: tiny("attention"),
         "hybrid": tiny_hybrid}  # fmt: skip


def build(kind: str, **changes) -> LanguageModel:
    torch.manual_seed(0)
    model = LanguageModel((tiny("hyena") if kind == "hyena" else KINDS[kind]()).replace(**changes)).eval()
    with torch.no_grad():  # large weights: the next token depends on the state (a small random model repeats its
        for weight in model.parameters():  # last token whatever came before), and greedy picks are not near-ties
            if weight.dim() == 2:
                weight.normal_(std=0.3)
    return model


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


# hyena: its filter positions are buffers computed when built, not saved, which from_pretrained must rebuild
@pytest.mark.parametrize("kind", [*KINDS, "hyena"])
def test_save_and_load_give_identical_logits(kind, tmp_path):
    model = build(kind)
    RebasedForCausalLM.from_language_model(model).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, RebasedForCausalLM) and not loaded.training
    ids = tokens(2, 11)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids))
    weights = load_file(tmp_path / "model.safetensors")  # the project's tensors under "model." + their name
    ours = model.state_dict()
    assert set(weights) == {f"model.{name}" for name in ours} - {"model.lm_head.weight"}  # tied: stored once
    assert all(torch.equal(tensor, ours[name.removeprefix("model.")]) for name, tensor in weights.items())
    assert loaded.model.lm_head.weight is loaded.model.embedding.weight  # and tied again when loaded


def test_a_checkpoint_missing_a_weight_is_refused(tmp_path):
    RebasedForCausalLM.from_language_model(build("rebased")).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mixer.proj_q.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not match.*layers\.1\.mixer\.proj_q\.weight"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_steps_the_state_and_equals_rebased_generate(kind, monkeypatch):
    model = build(kind)
    hf = RebasedForCausalLM.from_language_model(model)
    calls = {"prefill": 0, "step": 0}
    for name in calls:
        method = getattr(model, name)

        def counted(*args, _method=method, _name=name, **kwargs):
            calls[_name] += 1
            return _method(*args, **kwargs)

        monkeypatch.setattr(model, name, counted)
    prompts = tokens(3, 7)
    out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=10, do_sample=False)
    assert calls == {"prefill": 1, "step": 9}  # the prompt once, then one recurrent step per token fed back
    assert out[:, :7].equal(prompts)
    assert out[:, 7:].tolist() == generate(model, prompts, max_new_tokens=10, temperature=0.0)


@pytest.mark.parametrize("kind", ["rebased", "attention"])
def test_beam_search_through_the_cache_equals_beam_search_without_it(kind):
    hf = RebasedForCausalLM.from_language_model(build(kind))
    prompts = tokens(2, 5)
    options = dict(max_new_tokens=6, num_beams=3, num_return_sequences=3, do_sample=False)
    assert torch.equal(hf.generate(prompts, **options), hf.generate(prompts, use_cache=False, **options))


def test_a_forward_call_continues_the_cache_it_returned():
    hf = RebasedForCausalLM.from_language_model(build("rebased"))
    ids = tokens(2, 12)
    with torch.no_grad():
        whole = hf(ids).logits
        first = hf(ids[:, :8], use_cache=True)
        cache = first[CACHE_FIELD]  # transformers 5 names it cache, 4 past_key_values
        assert isinstance(cache, RecurrentCache) and cache.get_seq_length() == 8
        rest = hf(ids[:, 8:], **{CACHE_FIELD: cache})
    assert rest[CACHE_FIELD].get_seq_length() == 12
    assert_close(torch.cat([first.logits, rest.logits], dim=1), whole, rel_rms=1e-5, name="logits")


@pytest.mark.parametrize("kind", ["rebased", "attention"])
def test_loss_equals_the_projects_validation_loss(kind):
    model = build(kind)
    hf = RebasedForCausalLM.from_language_model(model)
    windows = tokens(2, 33)  # a validation batch: [B, L + 1]
    with torch.no_grad():
        loss = hf(windows, labels=windows).loss  # labels line up with the inputs; the shift is inside
    ours = math.log(evaluate_perplexity(model, [windows])["ppl/all"])
    assert loss.item() == pytest.approx(ours, rel=1e-5)
    labels = windows.clone()
    labels[:, :21] = -100  # transformers' ignore index, and the project's: only the last 12 targets count
    with torch.no_grad():
        tail = hf(windows, labels=labels).loss
        logits = model(windows[:, :-1])[:, 20:]  # the logits that predict them
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 21:].flatten())
    assert tail.item() == pytest.approx(expected.item(), rel=1e-5)


def test_right_padded_scores_equal_each_row_alone_and_left_padding_fails():
    """What lm-evaluation-harness's loglikelihood does: a right-padded batch, logits read before the padding."""
    model = build("rebased")
    hf = RebasedForCausalLM.from_language_model(model)
    rows = [tokens(1, 9, seed=2)[0], tokens(1, 5, seed=3)[0]]
    batch = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, : len(row)], mask[i, : len(row)] = row, 1
    with torch.no_grad():
        for attention_mask in (None, mask):
            logits = hf(batch, attention_mask=attention_mask).logits
            for i, row in enumerate(rows):
                assert_close(logits[i, : len(row)], model(row[None])[0], rel_rms=1e-6, name=f"row {i}")
        with pytest.raises(ValueError, match="left padding"):
            hf(batch, attention_mask=mask.flip(1))
    with pytest.raises(ValueError, match="padding, which a state carried on would take in"):
        hf.generate(batch, attention_mask=mask, max_new_tokens=2, do_sample=False)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run folder of `rebased train` (tiny model, two steps) on the package's sample texts."""
    folder = tmp_path_factory.mktemp("hf")
    shards, run = folder / "shards", folder / "run"
    assert main(["data", "prepare", ":sample", str(shards), "--tokenizer", "bytes", "--val-fraction", "0.2"]) == 0
    settings = ["warmup_steps=1", "eval_every=2", "eval_tokens=64", "device=cpu"]
    assert main(["train", str(shards), "--out", str(run), "--preset", "tiny", "--seq-len", "32", "--batch-tokens",
                 "64", "--steps", "2", *[arg for s in settings for arg in ("--set", s)]]) == 0  # fmt: skip
    return run


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "export"
    assert main(["export-hf", str(trained_run), str(out)]) == 0
    return out


def test_an_exported_run_loads_with_the_same_weights_and_logits(trained_run, exported):
    ours = load_file(trained_run / "model.safetensors")
    theirs = load_file(exported / "model.safetensors")
    assert sorted(theirs) == sorted(f"model.{name}" for name in ours)  # the run's tensors, renamed only
    assert all(torch.equal(theirs[f"model.{name}"], tensor) for name, tensor in ours.items())
    model, hf = checkpoint.load(trained_run), AutoModelForCausalLM.from_pretrained(exported)
    ids = tokens(2, 20)
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, model(ids))
    config = json.loads((exported / "config.json").read_text())
    assert config["model"] == json.loads((trained_run / "config.json").read_text())["model"]
    assert config["eos_token_id"] == load_tokenizer(trained_run).eos_id == hf.generation_config.eos_token_id


def test_the_exported_tokenizer_encodes_as_the_runs_and_starts_texts_after_eos(trained_run, exported):
    ours, theirs = load_tokenizer(trained_run), AutoTokenizer.from_pretrained(exported)
    text = f"The Union is strong; {EOS_TEXT} stays text, as in training. Grüße"
    ids = ours.encode(text)
    assert theirs.encode(text, add_special_tokens=False) == ids
    assert theirs(text)["input_ids"] == [ours.eos_id, *ids]  # as `rebased generate` starts a prompt
    assert theirs.eos_token_id == ours.eos_id and theirs.eos_token == EOS_TEXT
    assert theirs.decode(ids) == text
    assert "token_type_ids" not in theirs(text)  # the model takes input_ids and attention_mask only


def test_text_in_text_out_through_an_export_equals_rebased_generate(trained_run, tmp_path):
    """generate() on what the exported tokenizer makes of a text picks the tokens `rebased generate` picks for that
    prompt (which starts it after the end-of-document token). A model of large random weights stands in for the
    run's, which two steps of training leave repeating one byte whatever the prompt."""
    run = tmp_path / "run"
    model = build("hybrid", vocab_size=320)
    checkpoint.save(model, run)
    shutil.copyfile(trained_run / "tokenizer.json", run / "tokenizer.json")
    assert main(["export-hf", str(run), str(tmp_path / "export")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    text = "The state of the Union"
    out = hf.generate(**tokenizer(text, return_tensors="pt"), max_new_tokens=12, do_sample=False)
    eos = load_tokenizer(run).eos_id
    prompt = [eos, *load_tokenizer(run).encode(text)]  # what `rebased generate` feeds for --prompt TEXT
    expected = generate(model, [prompt], max_new_tokens=12, temperature=0.0, stop_tokens=[eos])[0]
    assert out[0, len(prompt) :].tolist() == expected  # twelve tokens, none the end of a document


def test_export_refuses_a_folder_it_did_not_write(trained_run, capsys):
    before = (trained_run / "config.json").read_text()
    assert main(["export-hf", str(trained_run), str(trained_run)]) == 2
    assert "not empty and holds no earlier export" in capsys.readouterr().err
    assert (trained_run / "config.json").read_text() == before


def test_trust_remote_code_loads_an_export_with_nothing_imported_first(exported, tmp_path):
    """How lm-evaluation-harness loads a model (`--model_args pretrained=DIR,trust_remote_code=True`): the folder's
    auto_map module imports rebased.hf, whose classes then load it."""
    code = f"""
import sys
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(exported)!r}, trust_remote_code=True)
print(type(model).__name__, "rebased.hf" in sys.modules)
model.save_pretrained({str(tmp_path / "again")!r})
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["RebasedForCausalLM", "True"]
    # saved again, the folder still takes its code from the installed package (no copy of rebased/hf)
    assert sorted(path.name for path in (tmp_path / "again").glob("*.py")) == ["rebased_remote_code.py"]
    again, first = (json.loads((folder / "config.json").read_text()) for folder in (tmp_path / "again", exported))
    assert again["auto_map"] == first["auto_map"]


def test_the_core_package_imports_neither_transformers_nor_rebased_hf_at_module_level():
    """transformers stays an optional extra: outside rebased/hf only a function (a verb's run) may import it."""
    package = Path(rebased.__file__).parent
    for path in package.rglob("*.py"):
        if path.relative_to(package).parts[0] == "hf":
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            optional = [name for name in names if name.split(".")[0] == "transformers" or name.startswith("rebased.hf")]
            assert not optional, f"{path} imports {optional}"


def test_export_without_transformers_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    for name in [name for name in sys.modules if name == "rebased.hf" or name.startswith("rebased.hf.")]:
        monkeypatch.delitem(sys.modules, name)
    assert main(["export-hf", "run", "out"]) == 2
    assert "pip install 'rebased[hf]'" in capsys.readouterr().err
