"""Save then load gives identical logits; missing, corrupt or mismatched files fail with a clear message."""

from __future__ import annotations

import json

import pytest
import torch

from rebased.checkpoint import MODEL_CONFIG_FILE, WEIGHTS_FILE, load, save
from rebased.model import LanguageModel
from rebased.presets import tiny, tiny_hybrid


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = LanguageModel(tiny("rebased")).eval()
    with torch.no_grad():  # move away from the init, so loading the init by mistake would show
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    save(model, tmp_path / "run", extra={"train": {"lr": 1e-3}})
    return model, tmp_path / "run"


@pytest.mark.parametrize("make", [lambda: tiny("rebased"), lambda: tiny("mamba"), tiny_hybrid])
def test_save_then_load_gives_identical_logits(tmp_path, make):
    torch.manual_seed(1)
    model = LanguageModel(make()).eval()
    save(model, tmp_path)
    loaded = load(tmp_path)
    ids = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert loaded.lm_head.weight is loaded.embedding.weight  # still tied after loading


def test_extra_run_config_is_kept(saved):
    _, run = saved
    assert json.loads((run / MODEL_CONFIG_FILE).read_text())["train"] == {"lr": 1e-3}


def test_missing_files(saved):
    _, run = saved
    (run / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load(run)
    (run / MODEL_CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=MODEL_CONFIG_FILE):
        load(run)


def test_corrupt_weights(saved):
    _, run = saved
    data = (run / WEIGHTS_FILE).read_bytes()
    (run / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        load(run)
    (run / WEIGHTS_FILE).write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load(run)


def test_corrupt_config(saved):
    _, run = saved
    (run / MODEL_CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load(run)


def test_config_that_does_not_match_the_weights(saved):
    _, run = saved
    data = json.loads((run / MODEL_CONFIG_FILE).read_text())
    data["model"]["d_model"] = 64
    (run / MODEL_CONFIG_FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="different model config"):
        load(run)


def test_invalid_config_names_the_field(saved):
    _, run = saved
    data = json.loads((run / MODEL_CONFIG_FILE).read_text())
    data["model"]["pattern"] = ["base_conv", "rebasde"]
    (run / MODEL_CONFIG_FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown mixer 'rebasde'"):
        load(run)
