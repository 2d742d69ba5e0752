"""`rebased generate RUN_DIR --prompt ...`: load a saved model and stream sampled tokens as they come.

Prompts are text when RUN_DIR holds a tokenizer.json (a language model of `rebased train`), else
space-separated token ids (an MQAR model); the output is printed the same way. A text prompt starts after the
end-of-document token, as every document did in training, so an empty prompt starts a new document.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rebased.cli import device, verb

TOKENIZER = "tokenizer.json"
HELD_BACK = "\ufffd"  # what decoding prints for the first bytes of a character still incomplete


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="directory with config.json and model.safetensors")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", type=_token_ids, default=(), help="comma-separated stop token ids")
    parser.add_argument("--device", type=device, default="cpu", help="cpu (default) or cuda")


def _token_ids(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated token ids."""
    try:
        return tuple(int(word) for word in text.split(",") if word.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None


class _IdCodec:
    """Token ids written as space-separated integers."""

    def encode(self, text: str) -> list[int]:
        try:
            return [int(word) for word in text.split()]
        except ValueError:
            raise ValueError(f"prompt {text!r}: without a {TOKENIZER} in the run directory, give token ids") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(f" {i}" for i in ids)

    def stream(self):
        return lambda token: self.decode([token])


class _TextCodec:
    """Text through the run's tokenizer; prompts begin after its end-of-document token."""

    def __init__(self, run_dir: Path):
        from rebased.tasks.lm.tokenizers import load_tokenizer

        self.tokenizer = load_tokenizer(run_dir)

    def encode(self, text: str) -> list[int]:
        return [self.tokenizer.eos_id, *self.tokenizer.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def stream(self):
        """token -> the text it adds: a token can end inside a character (byte-level BPE), so the text is
        decoded whole and printed from where the last complete character ended."""
        ids, shown = [], 0

        def next_text(token: int) -> str:
            nonlocal shown
            ids.append(token)
            text = self.decode(ids).rstrip(HELD_BACK)
            new, shown = text[shown:], max(shown, len(text))
            return new

        return next_text


def _codec(run_dir: Path):
    return _TextCodec(run_dir) if (run_dir / TOKENIZER).is_file() else _IdCodec()


def _check_fits(model, prompts: list[list[int]], max_new_tokens: int, stop: tuple[int, ...]) -> None:
    """Token ids inside the model's vocabulary, and prompt + new tokens inside its learned positions, checked
    before the first token is printed."""
    vocab = model.cfg.vocab_size
    for ids in [*prompts, stop]:
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"token ids {bad} are outside the model's vocabulary [0, {vocab})")
    positions = model.cfg.max_position_embeddings
    prompt = max(len(ids) for ids in prompts)
    if positions and prompt + max_new_tokens - 1 > positions:  # the last new token is never fed back
        raise ValueError(
            f"a {prompt}-token prompt and --max-new-tokens {max_new_tokens} go past the model's {positions} learned "
            f"positions: ask for at most {positions - prompt + 1} new tokens"
        )


@verb("generate", "sample from a saved model, streaming tokens as they come", _arguments)
def run(args: argparse.Namespace) -> int:
    import torch

    from rebased.checkpoint import load
    from rebased.decode import generate_static

    run_dir = Path(args.run_dir)
    model = load(run_dir, device=args.device)
    codec = _codec(run_dir)
    prompts = [codec.encode(text) for text in args.prompt]
    _check_fits(model, prompts, args.max_new_tokens, args.stop)
    stream = len(prompts) == 1  # one prompt: print each token as it arrives
    text_of = codec.stream()

    def show(row: int, token: int) -> None:
        print(text_of(token), end="", flush=True)

    outputs = generate_static(  # static buffers; on a GPU the decode step replays as one CUDA graph
        model,
        prompts,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        generator=torch.Generator(device=args.device).manual_seed(args.seed),
        stop_tokens=list(args.stop),
        on_token=show if stream else None,
    )
    if stream:
        print()
    else:
        for text, tokens in zip(args.prompt, outputs):
            print(f"{text} ->{codec.decode(tokens)}")
    return 0
