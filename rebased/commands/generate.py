"""`rebased generate RUN_DIR --prompt ...`: load a saved model and stream sampled tokens as they come.

Prompts are text when RUN_DIR holds a tokenizer.json (and the `tokenizers` package is installed), else
space-separated token ids; the output is printed the same way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rebased.cli import verb

TOKENIZER = "tokenizer.json"


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="directory with config.json and model.safetensors")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", default="", help="comma-separated stop token ids")
    parser.add_argument("--device", default="cpu")


class _IdCodec:
    """Token ids written as space-separated integers."""

    def encode(self, text: str) -> list[int]:
        try:
            return [int(word) for word in text.split()]
        except ValueError:
            raise ValueError(f"prompt {text!r}: without a {TOKENIZER} in the run directory, give token ids") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(f" {i}" for i in ids)


class _TextCodec:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def _codec(run_dir: Path):
    path = run_dir / TOKENIZER
    if path.is_file():
        try:
            return _TextCodec(path)
        except ImportError:
            print(f"rebased generate: {TOKENIZER} found but `tokenizers` is not installed; using ids", file=sys.stderr)
    return _IdCodec()


@verb("generate", "sample from a saved model, streaming tokens as they come", _arguments)
def run(args: argparse.Namespace) -> int:
    import torch

    from rebased.checkpoint import load
    from rebased.generate import generate

    run_dir = Path(args.run_dir)
    model = load(run_dir, device=args.device)
    codec = _codec(run_dir)
    prompts = [codec.encode(text) for text in args.prompt]
    stream = len(prompts) == 1  # one prompt: print each token as it arrives

    def show(row: int, token: int) -> None:
        print(codec.decode([token]), end="", flush=True)

    outputs = generate(
        model,
        prompts,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        generator=torch.Generator(device=args.device).manual_seed(args.seed),
        stop_tokens=[int(t) for t in args.stop.split(",") if t.strip()],
        on_token=show if stream else None,
    )
    if stream:
        print()
    else:
        for text, tokens in zip(args.prompt, outputs):
            print(f"{text} ->{codec.decode(tokens)}")
    return 0
