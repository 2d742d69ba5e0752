"""`rebased export-hf RUN_DIR OUT_DIR`: a saved model as a Hugging Face transformers model folder.

Needs the `hf` extra (pip install 'rebased[hf]'). The folder loads with AutoModelForCausalLM.from_pretrained
after `import rebased.hf`, or with trust_remote_code=True, and its tokenizer (for a language-model run) with
AutoTokenizer.from_pretrained.
"""

from __future__ import annotations

import argparse
import sys

from rebased.cli import verb


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="directory with config.json and model.safetensors (e.g. a `rebased train` run)")
    parser.add_argument("out_dir", help="the transformers folder to write (new, empty, or an earlier export)")


@verb("export-hf", "write a saved model (and its tokenizer) as a Hugging Face transformers folder", _arguments)
def run(args: argparse.Namespace) -> int:
    try:
        from rebased.hf import export_run
    except ImportError as error:  # transformers is not installed
        print(f"rebased export-hf: error: {error}", file=sys.stderr)
        return 2
    out_dir = export_run(args.run_dir, args.out_dir)
    print(f"{out_dir}: AutoModelForCausalLM.from_pretrained({str(out_dir)!r}, trust_remote_code=True)")
    return 0
