"""Milliseconds per optimizer step of the MQAR models (batch 512, the paper's settings) on a CUDA GPU, by op path
and step variant.

Times `rebased.train.train` itself, inside one training: a clock (train()'s stop_when, asked after every
optimizer step) waits for the GPU after step WARM_STEPS and after --steps more (default 40), and the wall time
between, over those steps, is one timing; the median of --repeats trainings (default 3) is reported, the
repeats on the line before it. So the number includes everything a sweep pays per step: the batch's gathers,
gradient accumulation, clipping, the fused AdamW, the loss read every 10 steps; and the host's jitter, which at
short L (a few ms a step) is of the order of a step. It leaves out what a training pays once: compiling, building
the model, and a CUDA-graph run's 3 eager steps and its capture at the 4th (the clock starts after step 10, when a
graphed step replays). One line per (op path, variant, cell); a cell that fails prints its error and the next one
runs.

    PYTHONPATH=. python benchmarks/mqar_cost_gpu.py auto-triton chunk-torch   # PATH: MODE-BACKEND
    PYTHONPATH=. python benchmarks/mqar_cost_gpu.py auto-triton --cells rebased:64:1024,based:64:2048
    PYTHONPATH=. python benchmarks/mqar_cost_gpu.py auto-triton --variants logits,fused,graph
    PYTHONPATH=. python benchmarks/mqar_cost_gpu.py auto-triton --variants graph-tiles --batch-scales 1,4 \
        --cells rebased:16:256,rebased:64:512 --pairs 32

--batch-scales R,...: each cell also at R times the paper's batch (and R times the micro-batch), reported per
512 examples. That bounds what training R runs of a grid as one stacked model could gain: a stacked model runs
the same kernels on R times the rows (its linear layers as batched matmuls, no cheaper). If R x 512 costs R
times 512, stacking cannot pay.

The op path is set on every mixer that has one (the linear-attention mixers); softmax attention always runs
SDPA.
Variants (TrainConfig settings): logits = the head's logits, then F.cross_entropy; fused = the fused head and
loss (the default); graph = fused, with the step captured as a CUDA graph; graph-logits = logits, graphed;
-triton = the fused loss's chunks through the Triton softmax kernel (rebased.ops.cross_entropy.AUTO_TRITON_ON_GPU);
-tiles = the fused loss in the Triton tile kernels, no logits (rebased.ops.cross_entropy.TILED_MAX_DIM);
-committed = the loss switches as committed (what a sweep runs: the tiles up to TILED_MAX_DIM, the row kernel beyond);
-torch-embedding = the token embedding's gradient from torch's backward, not the Triton kernel that every other
variant takes as committed (rebased.ops.embedding.EMBEDDING_TRITON_ON_GPU);
-torch-conv = the BaseConv's short convolution through torch's Conv1d, not the Triton kernels every other variant
takes as committed (rebased.ops.conv.SHORT_CONV_TRITON_ON_GPU);
-bv8 = the fused chunk kernels' value dims padded to at least 8 (fused_chunk.MIN_BV), to time what the narrower
state of the kernel ablation's value dims 1-4 saves;
-split-values = value dims from 9 to 16 that are not powers of two run as one pass of the fused chunk kernels per
power-of-two piece (10 as 8 + 2: fused_chunk.SPLIT_VALUES) rather than padded to 16;
-triton-scan = Mamba's selective scan in the Triton kernels (rebased.ops.scan.SCAN_TRITON_ON_GPU), not the torch
chunked form;
-triton-wkv = RWKV's WKV in the Triton kernels (rebased.ops.rwkv.WKV_TRITON_ON_GPU), not the torch chunked form;
-triton-affine = the ablation's gamma x (+ beta) feature maps in the LayerNorm's kernels without the norm
(rebased.ops.norm.AFFINE_TRITON_ON_GPU), not torch's elementwise ops;
-compile = the model's forward under torch.compile (TrainConfig.compile), inside the graph.

--micro-batch-tokens N,...: each cell also with gradient accumulation keeping a micro-batch within N tokens
(rebased.tasks.mqar.sweep.MICRO_BATCH_TOKENS, 262,144 as committed: 4 micro-batches at L 2048).
mqar_profile_gpu.py imports seconds_per_step and apply_variant from here.
"""

import argparse
import contextlib
import dataclasses
import gc
import itertools
import statistics
import time

import torch
from environment import versions  # benchmarks/ is on the path when a script here runs
from loss_bench import use_loss_kernel

from rebased.feature_maps import FeatureMap
from rebased.model import LanguageModel
from rebased.ops import conv, embedding, norm, rwkv, scan
from rebased.ops.norm import LayerNorm
from rebased.ops.triton import fused_chunk
from rebased.tasks.mqar import sweep
from rebased.tasks.mqar.grids import MQARRun, paper_pairs
from rebased.tasks.mqar.sweep import build_model, make_data, train_config
from rebased.train import train

# variant -> (TrainConfig settings, what computes the fused loss: torch chunks, the Triton row kernel over chunks
# of logits, or the Triton tile kernels without logits); a name's ending may set a kernel switch (SWITCHES)
VARIANTS = {
    "logits": ({"fused_loss": False, "cuda_graph": False}, "torch"),
    "fused": ({"fused_loss": True, "cuda_graph": False}, "torch"),
    "fused-triton": ({"fused_loss": True, "cuda_graph": False}, "rows"),
    "fused-tiles": ({"fused_loss": True, "cuda_graph": False}, "tiles"),
    "graph": ({"fused_loss": True, "cuda_graph": True}, "torch"),
    "graph-triton": ({"fused_loss": True, "cuda_graph": True}, "rows"),
    "graph-tiles": ({"fused_loss": True, "cuda_graph": True}, "tiles"),
    "graph-logits": ({"fused_loss": False, "cuda_graph": True}, "torch"),
    "graph-committed": ({"fused_loss": True, "cuda_graph": True}, "committed"),
    "graph-committed-torch-embedding": ({"fused_loss": True, "cuda_graph": True}, "committed"),
    "graph-committed-torch-conv": ({"fused_loss": True, "cuda_graph": True}, "committed"),
    "graph-committed-compile": ({"fused_loss": True, "cuda_graph": True, "compile": True}, "committed"),
    "graph-committed-bv8": ({"fused_loss": True, "cuda_graph": True}, "committed"),
    "graph-committed-split-values": ({"fused_loss": True, "cuda_graph": True}, "committed"),
    "graph-committed-triton-scan": ({"fused_loss": True, "cuda_graph": True}, "committed"),
    "graph-committed-triton-wkv": ({"fused_loss": True, "cuda_graph": True}, "committed"),
    "graph-committed-triton-affine": ({"fused_loss": True, "cuda_graph": True}, "committed"),
}


# variant name ending -> (module, switch, its value for that variant); every other variant takes the committed value
SWITCHES = {
    "-torch-embedding": (embedding, "EMBEDDING_TRITON_ON_GPU", False),
    "-torch-conv": (conv, "SHORT_CONV_TRITON_ON_GPU", False),
    "-bv8": (fused_chunk, "MIN_BV", 8),
    "-split-values": (fused_chunk, "SPLIT_VALUES", True),
    "-triton-scan": (scan, "SCAN_TRITON_ON_GPU", True),
    "-triton-wkv": (rwkv, "WKV_TRITON_ON_GPU", True),
    "-triton-affine": (norm, "AFFINE_TRITON_ON_GPU", True),
}
COMMITTED = {ending: getattr(module, name) for ending, (module, name, _) in SWITCHES.items()}


def apply_variant(variant: str) -> dict:
    """Set the kernel switches the variant names; return its TrainConfig settings."""
    settings, kernel = VARIANTS[variant]
    use_loss_kernel(kernel)
    for ending, (module, name, value) in SWITCHES.items():
        setattr(module, name, value if variant.endswith(ending) else COMMITTED[ending])
    return settings


WARM_STEPS, TIMED_STEPS = 10, 40  # a timing's clock starts after WARM_STEPS and runs TIMED_STEPS (--steps)
CELLS = (
    "rebased:64:128,rebased:64:512,rebased:64:2048,rebased:128:2048,rebased:512:2048,based:64:2048,attention:64:2048"
)


def parse_cells(text: str) -> list[tuple[str, int, int]]:
    """'model:d_model:L,...' -> [(model, d_model, L), ...]"""
    return [(m, int(d), int(length)) for m, d, length in (cell.split(":") for cell in text.split(","))]


def with_op_path(model: LanguageModel, mode: str, backend: str) -> LanguageModel:
    mixers = {
        name: dataclasses.replace(m, mode=mode, backend=backend) if hasattr(m, "backend") else m
        for name, m in model.cfg.mixers.items()
    }
    return LanguageModel(model.cfg.replace(mixers=mixers))


def with_norm_backend(model: LanguageModel, backend: str) -> LanguageModel:
    """Every LayerNorm of the model (blocks and feature maps) through this rebased.ops.norm backend."""
    for module in model.modules():
        if isinstance(module, (LayerNorm, FeatureMap)):
            module.backend = backend
    return model


class StepClock:
    """train()'s stop_when, asked after every optimizer step: waits for the GPU after step `start` and after step
    `start + steps`, keeps the wall time between, and never asks the training to stop."""

    def __init__(self, start: int, steps: int):
        self.marks = (start, start + steps)
        self.steps_taken = 0
        self.times: list[float] = []

    def __call__(self) -> bool:
        self.steps_taken += 1
        if self.steps_taken in self.marks:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
        return False

    def seconds_per_step(self) -> float:
        """Raises unless the clock was asked exactly once a step of a training of `start + steps` steps: asked
        less, the last mark was never reached; asked more, the marks fell on other steps than they name."""
        if self.steps_taken != self.marks[1]:
            raise RuntimeError(f"the clock was asked {self.steps_taken} times in a training of {self.marks[1]} "
                               "steps: train() no longer asks stop_when once after each step")  # fmt: skip
        return (self.times[1] - self.times[0]) / (self.marks[1] - self.marks[0])


def seconds_per_step(
    run: MQARRun,
    mode: str,
    backend: str,
    compile: bool = False,
    norm_backend: str | None = None,
    repeats: int = 3,
    variant: str = "fused",
    steps: int = TIMED_STEPS,
) -> float:
    """The median over `repeats` trainings of the wall time of `steps` optimizer steps after the first WARM_STEPS,
    each training's GPU work waited for at both ends. The run's data is made to hold one epoch longer than the
    training, so that no epoch ends (and no evaluation runs) inside it."""
    run = dataclasses.replace(run, train_examples=(WARM_STEPS + steps + 1) * run.batch_size)
    data = make_data(run)

    def timed() -> float:
        torch.manual_seed(0)
        model = with_op_path(build_model(run), mode, backend)
        if norm_backend is not None:
            model = with_norm_backend(model, norm_backend)
        settings = apply_variant(variant)
        config = dataclasses.replace(train_config(run), max_steps=WARM_STEPS + steps, early_stop_metric=None,
                                     **({"compile": compile} | settings))  # fmt: skip
        gc.collect()  # the last training's dead cycles (its graph among them), freed here and not inside this one
        clock = StepClock(WARM_STEPS, steps)
        train(model, (data.train.inputs, data.train.labels), config, progress=False, stop_when=clock)
        return clock.seconds_per_step()

    timings = [timed() for _ in range(repeats)]
    each = ", ".join(f"{timing * 1e3:.1f}" for timing in timings)
    # Every repeat printed, so that two variants' medians can be weighed against their spread
    unsteady = " (unsteady: more than 1.5x apart)" if max(timings) > 1.5 * min(timings) else ""
    print(f"  repeats: {each} ms/step{unsteady}", flush=True)
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="op paths MODE-BACKEND: auto-triton, chunk-torch, ...")
    parser.add_argument("--cells", default=CELLS, help=f"model:d_model:L,... (default {CELLS})")
    parser.add_argument("--variants", default="fused", help=f"step variants, comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--batch-scales", default="1", help="batch multiples, comma-separated (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per cell, their median reported (default 3)")
    parser.add_argument("--steps", type=int, default=TIMED_STEPS, help=f"steps a timing spans (default {TIMED_STEPS})")
    parser.add_argument("--pairs", type=int, default=None, help="key-value pairs (default: the paper's L / 4)")
    caps_help = f"micro-batch token caps, comma-separated (default {sweep.MICRO_BATCH_TOKENS})"
    parser.add_argument("--micro-batch-tokens", default=str(sweep.MICRO_BATCH_TOKENS), help=caps_help)
    args = parser.parse_args()
    print(versions(), flush=True)
    scales = [int(scale) for scale in args.batch_scales.split(",")]
    caps = [int(cap) for cap in args.micro_batch_tokens.split(",")]
    for path, variant, cap in itertools.product(args.paths, args.variants.split(","), caps):
        mode, backend = path.split("-")
        sweep.MICRO_BATCH_TOKENS = cap
        for (model, d_model, seq_len), scale in itertools.product(parse_cells(args.cells), scales):
            if (mode, backend) == ("parallel", "torch") and seq_len > 512:
                continue  # the T x T scores of a 128-example micro-batch at L 2048 take tens of GB
            label = f"{path} {variant}" + (f" x{scale}" if scale != 1 else "") + (f" mb{cap}" if len(caps) > 1 else "")
            cell = f"{label:44s} {model:9s} d{d_model:<4d} L{seq_len:<5d}"
            pairs = args.pairs or paper_pairs(seq_len)
            run = MQARRun(model, d_model, seq_len, pairs, 1e-3, batch_size=512 * scale, test_examples=512)
            try:
                with micro_batch_scaled(scale):
                    step = seconds_per_step(run, mode, backend, variant=variant, repeats=args.repeats, steps=args.steps)
                epoch = step / scale * (100_000 // 512)
                mem = torch.cuda.max_memory_allocated() / 2**30
                print(f"{cell} {step * 1e3:8.1f} ms/step {step / scale * 1e3:8.1f} ms per 512 {epoch:7.1f} s/epoch"
                      f"  peak {mem:5.1f} GiB", flush=True)  # fmt: skip
            except Exception as error:  # noqa: BLE001 - report and go on to the next cell
                print(f"{cell} FAILED {type(error).__name__}: {str(error)[:150]}", flush=True)
            torch.cuda.reset_peak_memory_stats()


@contextlib.contextmanager
def micro_batch_scaled(scale: int):
    """The sweep's micro-batch cap times `scale` (a stacked model of `scale` runs takes each run's micro-batch)."""
    saved = sweep.MICRO_BATCH_TOKENS
    sweep.MICRO_BATCH_TOKENS = saved * scale
    try:
        yield
    finally:
        sweep.MICRO_BATCH_TOKENS = saved


if __name__ == "__main__":
    main()
