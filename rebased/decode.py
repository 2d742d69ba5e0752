"""Fast decoding: every buffer allocated once, the whole decode step replayed as one CUDA graph.

rebased.generate.generate is the plain path: readable, any model, a Python-level step per token whose
kernels the host launches one by one (at batch 64 a 150M model's step is then bound by those launches, not
by the GPU). Here the same computation runs on static buffers:

    decoder = StaticDecoder(model, batch=64, capacity=prompt + new tokens)
    logits = decoder.prefill(prompt_ids)       # [B, T] through the fused training kernels; the states are
                                               # copied into the decoder's buffers (mixer.static_state)
    logits = decoder.step(ids)                 # [B]: one token, every state updated in place

On CUDA the step (embedding, every layer's mixer.step_static, the head) is captured once as a CUDA graph and
replayed: one launch per token. The replay then costs what the graph's many small kernels cost one after
another; compile=True torch.compiles the step first, so that fewer, fused kernels are captured. The graph is
captured on the buffers before the prompt's states are copied in, because the warm-up runs that capture needs
(Triton compiles, cuBLAS workspaces) write into them.

generate_static has generate's contract (mixed prompt lengths by teacher forcing, temperature / top-k /
top-p, stop tokens, streaming) with sampling on the device and no host sync per token unless a caller
streams: the stop tokens are checked every STOP_CHECK_EVERY tokens. Greedy outputs equal generate's
(tests/test_decode.py). Hyena (whose state grows with the sequence) has no static state: generate_static
then runs generate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from rebased.generate import _check, generate, sample
from rebased.mixers.base import copy_state_, map_state
from rebased.model import LanguageModel

PREFILL_TOKENS = 1 << 20  # prompt tokens per prefill pass (rows of the batch at a time)
STOP_CHECK_EVERY = 16  # tokens between looks at the stop tokens (each a host sync)
WARMUP_STEPS = 3  # eager steps before capture: lazy initialisation and compiles happen outside the graph


class StaticDecoder:
    """Static state buffers for a batch of `batch` rows and up to `capacity` positions (prompt included)."""

    def __init__(
        self, model: LanguageModel, batch: int, capacity: int, *, cuda_graph: bool | None = None, compile: bool = False
    ):
        self.model, self.batch, self.capacity = model.eval(), batch, capacity
        # compile: torch.compile the step (fusing its small elementwise kernels) before the graph captures it
        self.step_fn = torch.compile(model.step_static, dynamic=False) if compile else model.step_static
        self.device = next(model.parameters()).device
        positions = model.cfg.max_position_embeddings
        if positions > 0 and capacity > positions:
            raise ValueError(f"capacity {capacity} is beyond the model's max_position_embeddings={positions}")
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        self.ids = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.position = torch.zeros((), dtype=torch.long, device=self.device)
        self.states: list | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None

    @torch.inference_mode()
    def prefill(self, ids: Tensor) -> Tensor:
        """ids [batch, T] -> the last position's logits [batch, V]; the state after ids is in the buffers.

        Rows go through the model PREFILL_TOKENS at a time (at least one row): a prompt of batch x T tokens
        at once would need the activations of all of them (64 x 64k tokens: more than an H200 holds), while
        the states it leaves are small. Each block's states are copied into the buffers' rows and freed."""
        if ids.shape[0] != self.batch or ids.shape[1] >= self.capacity:
            raise ValueError(f"prefill takes [{self.batch}, T < {self.capacity}] ids, got {tuple(ids.shape)}")
        ids = ids.to(self.device)
        rows = max(1, PREFILL_TOKENS // ids.shape[1])
        logits = [self._prefill_rows(ids, start, min(start + rows, self.batch)) for start in range(0, self.batch, rows)]
        self.position.fill_(ids.shape[1])
        return torch.cat(logits)

    def _prefill_rows(self, ids: Tensor, start: int, end: int) -> Tensor:
        logits, state = self.model.prefill(ids[start:end], last_only=True)
        if self.states is None:
            self._allocate(state.layers)
        for i, layer in enumerate(self.model.layers):
            block = layer.mixer.static_state(state.layers[i], self.capacity)
            state.layers[i] = None  # freed as it goes: one layer's copy at a time
            copy_state_(map_state(lambda t: t[start:end], self.states[i]), block)  # into the rows' views
            del block
        return logits[:, -1]

    def _allocate(self, layer_states: list) -> None:
        """Buffers for the whole batch shaped like one block's static states; then the graph on them."""
        self.states = [
            map_state(lambda t: t.new_zeros(self.batch, *t.shape[1:]), layer.mixer.static_state(state, self.capacity))
            for layer, state in zip(self.model.layers, layer_states)
        ]
        if self.cuda_graph:
            self._capture()

    @torch.inference_mode()
    def step(self, ids: Tensor) -> Tensor:
        """ids [batch] (on the device: no host sync) -> logits [batch, V] for the next position. The returned
        tensor is overwritten by the next step."""
        if self.states is None:
            raise RuntimeError("StaticDecoder.step before prefill")
        self.ids.copy_(ids)
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.logits

    def _step(self) -> Tensor:
        logits = self.step_fn(self.ids, self.states, self.position)
        self.position.add_(1)
        return logits

    def _capture(self) -> None:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_STEPS):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()


def supports_static(model: LanguageModel) -> bool:
    """Whether every mixer has a fixed-size decoding state (all but Hyena)."""
    return all(layer.mixer.fixed_size_state for layer in model.layers)


@torch.inference_mode()
def generate_static(
    model: LanguageModel,
    prompt_ids: Sequence[Sequence[int]] | Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    stop_tokens: Sequence[int] = (),
    on_token: Callable[[int, int], None] | None = None,
    *,
    cuda_graph: bool | None = None,
) -> list[list[int]]:
    """rebased.generate.generate through a StaticDecoder: the same arguments and outputs."""
    prompts = prompt_ids.tolist() if isinstance(prompt_ids, Tensor) else [list(p) for p in prompt_ids]
    _check(prompts, max_new_tokens, temperature, top_k, top_p)
    if not supports_static(model):
        return generate(model, prompts, max_new_tokens, temperature, top_k, top_p, generator, stop_tokens, on_token)
    plan = _Plan(prompts, max_new_tokens, stop_tokens, next(model.parameters()).device)
    decoder = StaticDecoder(model, len(prompts), plan.longest + max_new_tokens, cuda_graph=cuda_graph)
    logits = decoder.prefill(plan.prompt[:, : plan.shortest])
    sampled = torch.empty(len(prompts), plan.steps, dtype=torch.long, device=decoder.device)
    for i in range(plan.steps):  # step i samples position shortest + i
        token = sample(logits, temperature, top_k, top_p, generator)
        sampled[:, i] = token
        if on_token is not None:
            plan.stream(sampled, i, on_token)
        if i + 1 == plan.steps or plan.stop_check_due(i) and plan.all_stopped(sampled, i):
            break
        logits = decoder.step(plan.next_ids(token, i))
    return plan.outputs(sampled.tolist())


class _Plan:
    """Which token each row feeds at each step: its own prompt token while it has one, then its sample. Row r's
    first new token is sampled at step first[r] = len(prompt r) - shortest prompt's length."""

    def __init__(self, prompts: list[list[int]], max_new_tokens: int, stop_tokens: Sequence[int], device):
        lengths = [len(p) for p in prompts]
        self.shortest, self.longest = min(lengths), max(lengths)
        self.max_new_tokens = max_new_tokens
        self.steps = self.longest - self.shortest + max_new_tokens  # the longest prompt's last new token
        self.first = [length - self.shortest for length in lengths]  # on the host (streaming, outputs)
        self.first_on_device = torch.tensor(self.first, device=device)  # (teacher forcing, the stop check)
        self.stop_set = set(stop_tokens)
        self.stops = torch.tensor(sorted(self.stop_set), dtype=torch.long, device=device)
        self.prompt = torch.zeros(len(prompts), self.longest + 1, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            self.prompt[row, : len(prompt)] = torch.tensor(prompt, device=device)
        self.streamed = [0] * len(prompts)
        self.stopped = [max_new_tokens == 0] * len(prompts)

    def next_ids(self, token: Tensor, i: int) -> Tensor:
        teacher = self.prompt[:, min(self.shortest + i, self.longest)]
        return torch.where(i < self.first_on_device, teacher, token)

    def outputs(self, sampled: list[list[int]]) -> list[list[int]]:
        """Each row's samples from its first new position on, up to max_new_tokens or its first stop token."""
        results = []
        for first, row_tokens in zip(self.first, sampled):
            tokens = row_tokens[first : first + self.max_new_tokens]
            cut = next((j for j, t in enumerate(tokens) if t in self.stop_set), len(tokens))
            results.append(tokens[:cut])
        return results

    def stop_check_due(self, i: int) -> bool:
        return bool(self.stop_set) and (i + 1) % STOP_CHECK_EVERY == 0

    def all_stopped(self, sampled: Tensor, i: int) -> bool:
        """Every row has met a stop token or its max_new_tokens by step i (one host sync)."""
        first = self.first_on_device[:, None]
        steps = torch.arange(i + 1, device=sampled.device)
        new = (steps >= first) & (steps < first + self.max_new_tokens)  # [B, i + 1]
        hit = (torch.isin(sampled[:, : i + 1], self.stops) & new).any(1)
        full = self.first_on_device + self.max_new_tokens <= i + 1
        return bool((hit | full).all())

    def stream(self, sampled: Tensor, i: int, on_token: Callable[[int, int], None]) -> None:
        """on_token for the rows whose step i sampled a new token (a host sync per step, as streaming needs)."""
        for row, token in enumerate(sampled[:, i].tolist()):
            if self.stopped[row] or i < self.first[row]:
                continue
            if token in self.stop_set or self.streamed[row] >= self.max_new_tokens:
                self.stopped[row] = True
                continue
            on_token(row, token)
            self.streamed[row] += 1
            self.stopped[row] = self.streamed[row] >= self.max_new_tokens
