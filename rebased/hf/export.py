"""A saved model (a `rebased train` run folder, or any folder rebased.checkpoint.save wrote) as a transformers
model folder: config.json, model.safetensors and generation_config.json from save_pretrained, the remote-code
module auto_map names, and, where the run has a tokenizer.json, the tokenizer files AutoTokenizer reads.

The weights are the run's tensors under "model." + their name (RebasedForCausalLM holds the LanguageModel as
`model`); the run folder itself is only read.
"""

from __future__ import annotations

import json
from pathlib import Path

from rebased import checkpoint
from rebased.hf.modeling import MODEL_TYPE, RebasedForCausalLM
from rebased.tasks.lm.tokenizers import TOKENIZER_FILE, load_tokenizer


def hf_tokenizer(run_dir: str | Path):
    """The run's tokenizer.json as a transformers fast tokenizer. Its end-of-document token is eos, and also bos:
    with add_special_tokens=True (the default) an encoded text starts with it, as every training document did
    and as `rebased generate` starts a prompt. As in training, "<|endoftext|>" inside a text stays text."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    project = load_tokenizer(run_dir)
    backend = Tokenizer.from_str(project.to_json())
    eos = backend.id_to_token(project.eos_id)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{eos} $A", pair=f"{eos} $A {eos} $B", special_tokens=[(eos, project.eos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=eos,
        eos_token=eos,
        split_special_tokens=True,
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
    )


def export_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the model saved in run_dir (and its tokenizer, if any) to out_dir for transformers; returns out_dir.
    out_dir must be new, empty, or an earlier export: nothing else is overwritten."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    _check_out_dir(out_dir)
    language_model = checkpoint.load(run_dir)  # checks the weights against the config's hash
    tokenizer = hf_tokenizer(run_dir) if (run_dir / TOKENIZER_FILE).is_file() else None
    eos = {} if tokenizer is None else {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    RebasedForCausalLM.from_language_model(language_model, **eos).save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def _check_out_dir(out_dir: Path) -> None:
    if not out_dir.exists() or not any(out_dir.iterdir()) or _is_export(out_dir):
        return
    raise ValueError(f"{out_dir} is not empty and holds no earlier export: choose a new folder")


def _is_export(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False
