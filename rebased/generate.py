"""Sampling on top of prefill / step: the prompt goes through the parallel or chunk form once, then one
recurrent step per token, so a recurrent model decodes in constant memory.

Batched prompts of different lengths need no padding token: the batch is prefilled up to the shortest
prompt, and from there each step feeds every row its own next prompt token while it has one (teacher
forcing) or its sampled token after that. Every row thus sees exactly its own prompt, at its own positions.

Sampling: logits / temperature, then top-k, then top-p (nucleus), then a draw from `generator`;
temperature 0 is greedy. A row stops after max_new_tokens or on a stop token (not included in the output).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from rebased.model import LanguageModel


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top k, and outside the smallest set with probability >= top_p, to -inf."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # mass of the tokens ranked above
        drop = torch.zeros_like(ordered, dtype=torch.bool).scatter(-1, order, before >= top_p)  # vocab order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(
    logits: Tensor,  # [B, V]
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:  # [B]
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check(prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float, top_k: int, top_p: float):
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompt_ids must hold at least one prompt, each of at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")


@torch.inference_mode()
def generate(
    model: LanguageModel,
    prompt_ids: Sequence[Sequence[int]] | Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    stop_tokens: Sequence[int] = (),
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (a list of token-id lists, or a [B, T] tensor).

    on_token(row, token) is called as each token is produced, for streaming.
    """
    prompts = prompt_ids.tolist() if isinstance(prompt_ids, Tensor) else [list(p) for p in prompt_ids]
    _check(prompts, max_new_tokens, temperature, top_k, top_p)
    model.eval()
    device = next(model.parameters()).device
    lengths = [len(p) for p in prompts]
    shortest = min(lengths)
    start = torch.tensor([p[:shortest] for p in prompts], device=device)
    logits, state = model.prefill(start, last_only=True)
    logits = logits[:, -1]
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [max_new_tokens == 0] * len(prompts)
    stops = set(stop_tokens)
    position = shortest
    while not all(done):
        sampled = sample(logits, temperature, top_k, top_p, generator).tolist()
        next_ids = []
        for row, prompt in enumerate(prompts):
            if position < len(prompt):  # still inside this row's prompt: teacher-force it
                next_ids.append(prompt[position])
                continue
            token = sampled[row]
            next_ids.append(token)
            if done[row]:
                continue
            if token in stops:
                done[row] = True
                continue
            outputs[row].append(token)
            if on_token is not None:
                on_token(row, token)
            done[row] = len(outputs[row]) >= max_new_tokens
        if all(done):
            break
        logits, state = model.step(torch.tensor(next_ids, device=device), state)
        position += 1
    return outputs
