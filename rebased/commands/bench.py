"""`rebased bench`: check every op mode against the float64 reference, then time them across lengths;
`--suite`: the GPU suite beside the peers; `--train`: language-model training throughput."""

from __future__ import annotations

import argparse
import sys

from rebased.cli import device, names, positive_int, positive_ints, verb


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--feature-map", default="rebased", help="polynomial feature map (rebased, taylor, square...)")
    parser.add_argument("--lengths", type=positive_ints, default=None,
                        help="comma-separated sequence lengths (default 256,1024,4096; suite 1k..64k)")  # fmt: skip
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--heads", type=positive_int, default=None, help="default 4 (suite: 16)")
    parser.add_argument("--head-dim", type=positive_int, default=16)
    parser.add_argument("--value-dim", type=positive_int, default=64)
    parser.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default float32 (suite: bfloat16)"
    )
    parser.add_argument("--device", type=device, default=None,
                        help="cpu or cuda (default: cpu; --train: cuda where there is a GPU)")  # fmt: skip
    parser.add_argument("--backends", type=names, default=("torch",), help="comma-separated: torch, triton")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument(
        "--suite",
        action="store_true",
        help="GPU suite: fixed tokens per call (--tokens), every mode beside SDPA and fla, and the decode step",
    )
    parser.add_argument("--tokens", type=positive_int, default=65536,
                        help="suite: tokens per call (batch = tokens // T)")  # fmt: skip
    parser.add_argument(
        "--entries",
        type=names,
        default=("chunk/triton", "parallel/triton", "chunk/torch", "parallel/torch"),
        help="suite: mode/backend pairs, or chunk_states/triton (the chunk-states kernels)",
    )
    parser.add_argument("--decode-contexts", type=positive_ints, default=(1024, 4096, 16384, 65536),
                        help="suite: SDPA KV-cache lengths")  # fmt: skip
    parser.add_argument("--out", default=None, help="suite / train: write DIR/bench.md (train.md) and .json")
    parser.add_argument(
        "--train",
        action="store_true",
        help="training throughput of whole models (pile_150m by "
        "default): tokens/s, MFU and peak memory at --lengths (default 2048,8192), --tokens per step",
    )
    parser.add_argument(
        "--models",
        type=names,
        default=("rebased", "based", "attention"),
        help="train: the preset's models (pile_150m: rebased, based, attention)",
    )
    parser.add_argument(
        "--generate",
        action="store_true",
        help="generation throughput of whole models (pile_150m by default): prefill time, ms per decode step, "
        "tokens/s and peak memory at --batches and --contexts, the static decoder beside the plain path",
    )
    parser.add_argument("--batches", type=positive_ints, default=(1, 64), help="generate: batch sizes")
    parser.add_argument("--contexts", type=positive_ints, default=(1024, 4096, 16384, 65536),
                        help="generate: prompt lengths")  # fmt: skip
    parser.add_argument("--decode-steps", type=positive_int, default=64, help="generate: timed decode steps")
    parser.add_argument("--preset", default="pile_150m", help="train / generate: model preset")
    parser.add_argument("--steps", type=positive_int, default=15, help="train: optimizer steps per case")
    parser.add_argument("--compile", action="store_true",
                        help="train: torch.compile the model; generate: the static decode step")  # fmt: skip


@verb("bench", "check the linear-attention ops against the reference and time every mode", _arguments)
def run(args: argparse.Namespace) -> int:
    import torch

    from rebased.bench.ops import OpBenchConfig, check_modes, time_modes

    if args.suite:
        return _suite(args)
    if args.train:
        return _train(args)
    if args.generate:
        return _generate(args)
    from rebased.tables import markdown_table

    config = OpBenchConfig(
        feature_map=args.feature_map,
        batch=args.batch,
        heads=4 if args.heads is None else args.heads,
        head_dim=args.head_dim,
        value_dim=args.value_dim,
        lengths=args.lengths or (256, 1024, 4096),
        backends=args.backends,
        dtype=args.dtype or "float32",
        device=args.device or "cpu",
        repeats=args.repeats,
    )
    torch.set_flush_denormal(True)
    print(
        f"rebased bench: {config.feature_map} kernel, B={config.batch} H={config.heads} D={config.head_dim} "
        f"V={config.value_dim} {config.dtype} on {config.device} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)"
    )
    print(f"\nCorrectness at T={config.check_length} with an initial state, relative RMS error against float64:")
    checks = check_modes(config)
    print(
        markdown_table(
            ["mode", "backend", "output", "final state", "worst grad"],
            [[r.mode, r.backend, r.output_err, r.state_err, r.grad_err] for r in checks],
        )
    )
    print(f"\nTime, median of {config.repeats} (ms; '-' = not run: the recurrent scan is a Python loop):")
    show = sys.stdout.isatty()
    rows = time_modes(
        config, progress=lambda what: show and print(f"  timing {what} ...".ljust(40), end="\r", flush=True)
    )
    table = [[r.length, r.mode, r.backend, r.forward_ms, r.backward_ms] for r in rows]
    print(markdown_table(["T", "mode", "backend", "forward", "forward+backward"], table))
    worst = max(max(r.output_err, r.grad_err) for r in checks)
    tolerance = 1e-4 if config.dtype == "float32" else 2e-2
    print(f"\nworst relative error {worst:.2e} ({'within' if worst <= tolerance else 'ABOVE'} {tolerance:g})")
    return 0 if worst <= tolerance else 1


def _suite(args: argparse.Namespace) -> int:
    """The GPU suite; prints the tables and, with --out, writes them with the command, versions and GPU."""
    import dataclasses

    import torch

    from rebased.bench.gpu_suite import SuiteConfig, time_decode, time_suite
    from rebased.bench.ops import OpBenchConfig, check_modes

    if not torch.cuda.is_available():
        raise ValueError("--suite needs a CUDA GPU; without one, `rebased bench` (no --suite) times the torch ops")
    config = SuiteConfig(
        feature_map=args.feature_map, tokens=args.tokens, heads=16 if args.heads is None else args.heads,
        head_dim=args.head_dim, value_dim=args.value_dim, entries=args.entries, dtype=args.dtype or "bfloat16",
        lengths=args.lengths or SuiteConfig.lengths, decode_contexts=args.decode_contexts,
    )  # fmt: skip
    check = OpBenchConfig(
        feature_map=config.feature_map, batch=2, heads=4, head_dim=config.head_dim, value_dim=config.value_dim,
        modes=("parallel", "chunk"), dtype=config.dtype, device="cuda",
    )  # fmt: skip
    checks = check_modes(check) + check_modes(dataclasses.replace(check, modes=("chunk",), backends=("triton",)))
    sections = [_header(config)]
    _emit(sections, _check_section(check, checks), args.out)

    def save_partial(rows_so_far):
        partial = _time_section(config, rows_so_far, done=False)
        _save(sections + [partial], args.out)

    rows = time_suite(config, progress=lambda what: print(f"  {what}", file=sys.stderr, flush=True),
                      on_row=save_partial if args.out else lambda _: None)  # fmt: skip
    _emit(sections, _time_section(config, rows), args.out)
    decode = time_decode(config)
    _emit(sections, _decode_section(config, decode), args.out)
    if args.out:
        _write(args.out, sections, config, rows, decode)
    return 0


def _train(args: argparse.Namespace) -> int:
    """Training throughput of whole models; prints the table and, with --out, writes train.md and train.json."""

    from rebased.bench.train_throughput import ThroughputConfig, time_training
    from rebased.tables import markdown_table
    from rebased.train.loop import resolve_device

    option = "kind" if args.preset == "pile_150m" else "mixer"
    config = ThroughputConfig(
        preset=args.preset, option=option, models=args.models, seq_lens=args.lengths or (2048, 8192),
        batch_tokens=args.tokens, steps=args.steps, compile=args.compile,
        device=str(resolve_device(args.device or "auto")),
    )  # fmt: skip
    rows = time_training(config, progress=lambda what: print(f"  {what}", file=sys.stderr, flush=True))
    base = {r.seq_len: r for r in rows if r.model == "attention"}
    table = [
        [r.model, r.seq_len, r.batch_tokens, f"{r.params / 1e6:.1f}M", round(r.tokens_per_s), r.step_ms, r.mfu,
         r.peak_gib, r.tokens_per_s / base[r.seq_len].tokens_per_s if r.seq_len in base else float("nan")]
        for r in rows
    ]  # fmt: skip
    headers = ["model", "seq len", "tokens/step", "params", "tokens/s", "step ms", "MFU", "peak GiB", "x attention"]
    text = (
        f"{_model_bench_header('train', config.device)}; {config.preset}, bf16 autocast on CUDA, AdamW, "
        f"{config.steps} steps a case, the rate of the last third; compile {config.compile}\n\n"
        + markdown_table(headers, table)
    )
    print(text)
    if args.out:
        _write_model_bench(args.out, "train", text, config, rows)
    return 0


def _generate(args: argparse.Namespace) -> int:
    """Generation throughput; prints the table and, with --out, writes generate.md, generate.json and .png."""
    import os

    from rebased.bench.generation import GenerationConfig, plot_generation, time_generation
    from rebased.tables import markdown_table
    from rebased.train.loop import resolve_device

    device = str(resolve_device(args.device or "auto"))
    config = GenerationConfig(
        preset=args.preset, option="kind" if args.preset == "pile_150m" else "mixer", models=args.models,
        batches=args.batches, contexts=args.contexts, steps=args.decode_steps, device=device,
        dtype="bfloat16" if device.startswith("cuda") else "float32", compile=args.compile,
    )  # fmt: skip
    rows = time_generation(config, progress=lambda what: print(f"  {what}", file=sys.stderr, flush=True))
    base = {(r.batch, r.context): r for r in rows if r.model == "attention" and r.status == "ok"}
    table = [
        [r.model, r.batch, r.context, r.prefill_s, r.step_ms, _whole(r.tokens_per_s), r.plain_step_ms, r.peak_gib,
         r.tokens_per_s / base[r.batch, r.context].tokens_per_s if (r.batch, r.context) in base else float("nan"),
         r.status]
        for r in rows
    ]  # fmt: skip
    headers = ["model", "batch", "context", "prefill s", "step ms", "tokens/s", "plain step ms", "peak GiB",
               "x attention", "status"]  # fmt: skip
    text = (
        f"{_model_bench_header('generate', device)}; {config.preset}, random weights, {config.dtype}, greedy; "
        f"{config.steps} timed steps after {config.warmup} (plain path: {config.plain_steps}); compiled step: "
        f"{config.compile}\n\n" + markdown_table(headers, table)
    )
    print(text)
    if args.out:
        _write_model_bench(args.out, "generate", text, config, rows)
        plot_generation(rows, os.path.join(args.out, "generate.png"))
    return 0


def _whole(x: float) -> float | int:
    return round(x) if x == x else x  # NaN (a case that did not fit) stays NaN


def _model_bench_header(kind: str, device: str) -> str:
    """The title, the command and the machine of a `--train` or `--generate` table."""
    import platform

    import torch

    where = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    return (
        f"# rebased bench --{kind}\n\ncommand: `rebased {' '.join(sys.argv[1:])}`\n\n{where}; python "
        f"{platform.python_version()}; torch {torch.__version__}"
    )


def _write_model_bench(out: str, stem: str, text: str, config, rows: list) -> None:
    """OUT/STEM.md (the printed text) and OUT/STEM.json (the command, the config and every row)."""
    import dataclasses
    import json
    import os

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(text + "\n")
    payload = {"command": "rebased " + " ".join(sys.argv[1:]), "config": dataclasses.asdict(config),
               "rows": [dataclasses.asdict(r) for r in rows]}  # fmt: skip
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(payload, f, indent=1)


def _emit(sections: list[str], text: str, out: str | None) -> None:
    """Print a section and, with --out, rewrite bench.md so far (a long run cut short keeps what it had)."""
    if len(sections) == 1:
        print(sections[0])
    sections.append(text)
    print(text, flush=True)
    _save(sections, out)


def _save(sections: list[str], out: str | None) -> None:
    """With --out, (re)write bench.md from these sections."""
    import os

    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "bench.md"), "w") as f:
            f.write("\n".join(sections) + "\n")


def _check_section(check, checks) -> str:
    from rebased.tables import markdown_table

    table = [[r.mode, r.backend, r.output_err, r.state_err, r.grad_err] for r in checks]
    return (
        f"\nCorrectness ({check.dtype}, T={check.check_length}, with an initial state), relative RMS vs float64:\n"
        + markdown_table(["mode", "backend", "output", "final state", "worst grad"], table)
    )


def _time_section(config, rows, done: bool = True) -> str:
    from rebased.tables import markdown_table

    ours = {r.length: r for r in rows if r.name == "chunk/triton"}
    nan = float("nan")

    def ratio(row, field):
        base = getattr(ours[row.length], field) if row.length in ours else nan
        return getattr(row, field) / base if base == base and base > 0 else nan

    table = [
        [r.name, r.length, r.forward_ms, r.backward_ms, ratio(r, "forward_ms"), ratio(r, "backward_ms"),
         r.forward_mib, r.backward_mib, r.note]
        for r in rows
    ]  # fmt: skip
    headers = ["op", "T", "fwd ms", "fwd+bwd ms", "fwd x ours", "fwd+bwd x ours", "fwd MiB", "fwd+bwd MiB", "note"]
    return (
        f"\nTime (median ms, triton.testing.do_bench) and peak memory above the inputs (MiB); {config.tokens} "
        f"tokens x {config.heads} heads per call, q/k dim {config.head_dim} (SDPA {config.value_dim}), v dim "
        f"{config.value_dim}; 'x ours' = time / chunk/triton time at that T"
        + ("" if done else f" (partial: the suite was still running after these {len(rows)} rows)")
        + ":\n"
        + markdown_table(headers, table)
    )


def _decode_section(config, decode) -> str:
    from rebased.tables import markdown_table

    table = [[r.name, r.batch, r.context or "any", r.step_us, r.note] for r in decode]
    return f"\nDecode step, one layer of {config.heads} heads (median us, CUDA graph replay):\n" + markdown_table(
        ["op", "batch", "context", "step us", "note"], table
    )


def _write(out: str, sections, config, rows, decode) -> None:
    import dataclasses
    import json
    import os

    payload = {"command": "rebased " + " ".join(sys.argv[1:]), "config": dataclasses.asdict(config)}
    payload |= {"rows": [dataclasses.asdict(r) for r in rows], "decode": [dataclasses.asdict(r) for r in decode]}
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(payload, f, indent=1, default=str)


def _header(config) -> str:
    import platform

    import torch
    import triton

    try:
        import fla

        fla_version = fla.__version__
    except ImportError:
        fla_version = "not installed"
    return (
        f"# rebased bench --suite\n\ncommand: `rebased {' '.join(sys.argv[1:])}`\n\n"
        f"GPU: {torch.cuda.get_device_name()}; python {platform.python_version()}; torch {torch.__version__}; "
        f"triton {triton.__version__}; flash-linear-attention (fla-core) {fla_version}; "
        f"feature map {config.feature_map}; {config.dtype}"
    )
