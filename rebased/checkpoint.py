"""Save and load a model: RUN_DIR/model.safetensors (weights) beside RUN_DIR/config.json.

config.json holds {"model": ModelConfig.to_dict(), ...anything else the caller records (the run config)}.
The weights file carries the SHA-256 of the model config it was saved with, so a config.json edited or
swapped afterwards is caught at load time instead of producing a silently different model. Every failure
names the file: missing (FileNotFoundError), unreadable or corrupt, or not matching (ValueError).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from rebased.config import ModelConfig
from rebased.model import LanguageModel

WEIGHTS_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "config.json"
_HASH_KEY = "model_config_sha256"


def config_hash(cfg: ModelConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()


def save(model: LanguageModel, run_dir: str | Path, extra: dict | None = None) -> Path:
    """Write config.json and model.safetensors into run_dir (created if needed); returns run_dir."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    extra = dict(extra or {})
    if "model" in extra:
        raise ValueError("extra must not have a 'model' key: config.json's 'model' is the model's own config")
    (run_dir / MODEL_CONFIG_FILE).write_text(json.dumps({"model": model.cfg.to_dict(), **extra}, indent=2) + "\n")
    save_model(model, str(run_dir / WEIGHTS_FILE), metadata={_HASH_KEY: config_hash(model.cfg)})
    return run_dir


def load_config(run_dir: str | Path) -> ModelConfig:
    path = Path(run_dir) / MODEL_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {MODEL_CONFIG_FILE} in {run_dir} (looked for {path})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ValueError(f"{path} has no 'model' section")
    try:
        return ModelConfig.from_dict(data["model"])
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: invalid model config: {error}") from None


def load(run_dir: str | Path, device: str | torch.device = "cpu") -> LanguageModel:
    """Rebuild the model from config.json and fill it from model.safetensors; fails clearly on any mismatch."""
    cfg = load_config(run_dir)
    path = Path(run_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {run_dir} (looked for {path})")
    try:
        with safe_open(str(path), framework="pt") as weights:
            saved_hash = (weights.metadata() or {}).get(_HASH_KEY)
    except Exception as error:  # safetensors raises its own error types for truncated or garbled files
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
    if saved_hash != config_hash(cfg):
        raise ValueError(f"{path} was saved with a different model config than {Path(run_dir) / MODEL_CONFIG_FILE}")
    model = LanguageModel(cfg)
    try:
        load_model(model, str(path), strict=True, device=str(device))
    except Exception as error:
        raise ValueError(f"{path} does not fit the model in {MODEL_CONFIG_FILE}: {error}") from None
    return model.to(device).eval()
