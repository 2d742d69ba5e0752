"""Generation throughput (`rebased bench --generate`): prefill time, ms per decode step, tokens/s and peak
memory of whole language models (random weights, bf16, greedy) across batch sizes and context lengths.

Each case prefills a random prompt of `context` tokens, then decodes `steps` tokens with the static decoder
(rebased.decode: static buffers, the step one CUDA graph on a GPU) and, for comparison, `plain_steps` tokens
with the plain path (rebased.generate's model.step, a state rebuilt every token, a KV cache grown by
copying). A step's time is the mean over the timed steps after `warmup` untimed ones; tokens/s = batch /
step time. A case that does not fit in memory is reported as such and the run goes on.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rebased.decode import StaticDecoder
from rebased.model import LanguageModel
from rebased.tasks.lm.train import lm_config


@dataclass(frozen=True)
class GenerationConfig:
    preset: str = "pile_150m"
    option: str = "kind"  # the preset's argument that takes the model names below ("mixer" for tiny)
    models: tuple[str, ...] = ("rebased", "based", "attention")
    batches: tuple[int, ...] = (1, 64)
    contexts: tuple[int, ...] = (1024, 4096, 16384, 65536)
    steps: int = 64  # timed static-decoder steps
    plain_steps: int = 8  # timed plain-path steps (0: skip the plain path)
    warmup: int = 4
    device: str = "cuda"
    dtype: str = "bfloat16"
    compile: bool = False  # torch.compile the static step before its graph is captured


@dataclass(frozen=True)
class GenerationRow:
    model: str
    batch: int
    context: int
    prefill_s: float  # NaN: did not fit
    step_ms: float
    tokens_per_s: float
    plain_step_ms: float  # NaN: not measured or did not fit
    peak_gib: float  # the static path, prefill included
    status: str = "ok"


def build(config: GenerationConfig, model: str) -> LanguageModel:
    torch.manual_seed(0)
    model = LanguageModel(lm_config(config.preset, **{config.option: model}))
    return model.to(device=config.device, dtype=getattr(torch, config.dtype)).eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(device: str, fn: Callable[[], object]) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


@torch.inference_mode()
def time_static(config: GenerationConfig, model: LanguageModel, batch: int, context: int) -> tuple[float, float]:
    """(prefill seconds, ms per decode step) of the static decoder."""
    prompt = torch.randint(model.cfg.vocab_size, (batch, context), device=config.device)
    decoder = StaticDecoder(model, batch, context + config.warmup + config.steps + 1, compile=config.compile)
    decoder.prefill(prompt[:, : min(context, 8192)])  # compiles and captures the graph: not part of the timing
    prefill_s = _timed(config.device, lambda: decoder.prefill(prompt))
    ids = prompt[:, -1]
    for _ in range(config.warmup):
        ids = decoder.step(ids).argmax(-1)

    def decode() -> None:
        token = ids
        for _ in range(config.steps):
            token = decoder.step(token).argmax(-1)  # greedy on the device: no host sync between steps

    return prefill_s, 1e3 * _timed(config.device, decode) / config.steps


@torch.inference_mode()
def time_plain(config: GenerationConfig, model: LanguageModel, batch: int, context: int) -> float:
    """ms per decode step of the plain path (model.step), after a prefill of the same prompt."""
    prompt = torch.randint(model.cfg.vocab_size, (batch, context), device=config.device)
    logits, state = model.prefill(prompt, last_only=True)
    token = logits[:, -1].argmax(-1)
    for _ in range(config.warmup):
        logits, state = model.step(token, state)
        token = logits.argmax(-1)

    def decode() -> None:
        nonlocal state, token
        for _ in range(config.plain_steps):
            logits, state = model.step(token, state)
            token = logits.argmax(-1)

    return 1e3 * _timed(config.device, decode) / config.plain_steps


def _if_it_fits(measure: Callable[[], object], cuda: bool) -> object | None:
    """measure(), or None where it ran out of memory; either way its memory is handed back before the next case."""
    try:
        return measure()
    except torch.OutOfMemoryError:
        return None
    finally:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def time_case(config: GenerationConfig, model: LanguageModel, name: str, batch: int, context: int) -> GenerationRow:
    nan = float("nan")
    cuda = config.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    static = _if_it_fits(lambda: time_static(config, model, batch, context), cuda)
    if static is None:
        return GenerationRow(name, batch, context, nan, nan, nan, nan, nan, "out of memory")
    prefill_s, step_ms = static
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else nan
    # the plain path's growing cache needs about twice the memory: a NaN in the row where it does not fit
    plain_ms = _if_it_fits(lambda: time_plain(config, model, batch, context), cuda) if config.plain_steps else None
    plain_ms = nan if plain_ms is None else plain_ms
    return GenerationRow(name, batch, context, prefill_s, step_ms, 1e3 * batch / step_ms, plain_ms, peak)


def time_generation(config: GenerationConfig, progress: Callable[[str], None] = print) -> list[GenerationRow]:
    """Every case; progress gets each row as it is measured (a run cut short still leaves its rows)."""
    rows = []
    for name in config.models:
        model = build(config, name)
        for batch in config.batches:
            for context in config.contexts:
                rows.append(time_case(config, model, name, batch, context))
                progress(str(rows[-1]))
        del model
        gc.collect()
    return rows


def plot_generation(rows: list[GenerationRow], path) -> None:
    """tokens/s against context, one panel per batch size, one line per model (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r.batch for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for model in dict.fromkeys(r.model for r in rows):
            mine = [r for r in rows if r.model == model and r.batch == batch and r.status == "ok"]
            ax.plot([r.context for r in mine], [r.tokens_per_s for r in mine], "o-", label=f"{model} (static)")
            plain = [r for r in mine if r.plain_step_ms == r.plain_step_ms]
            ax.plot([r.context for r in plain], [1e3 * batch / r.plain_step_ms for r in plain], "x:",
                    label=f"{model} (plain)")  # fmt: skip
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="generated tokens/s",
               title=f"batch {batch}")  # fmt: skip
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
