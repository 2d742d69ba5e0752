"""The Hugging Face transformers interface (pip install 'rebased[hf]'); the core package never imports it.

Importing this module registers the model type "rebased" with AutoConfig and AutoModelForCausalLM, so that
plain `AutoModelForCausalLM.from_pretrained(folder)` loads an exported folder. Without that import, pass
`trust_remote_code=True`: the folder's auto_map names a one-line module that imports this one.

    rebased export-hf RUN_DIR OUT_DIR          # or export_run(RUN_DIR, OUT_DIR)
"""

from __future__ import annotations

from rebased.hf.export import export_run, hf_tokenizer
from rebased.hf.modeling import RebasedConfig, RebasedForCausalLM, RecurrentCache, register

register()

__all__ = ["RebasedConfig", "RebasedForCausalLM", "RecurrentCache", "export_run", "hf_tokenizer"]
