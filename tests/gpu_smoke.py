"""GPU smoke run: every mixer's forward and backward under bf16 autocast, decoding, and generation on CUDA.

    python tests/gpu_smoke.py [--device cuda]

Per mixer (and ReBased again on the torch ops, and in the chunk form), the mixer alone at d_model 256, T 512,
batch 4, x ~ N(0, 1):
  * bf16 autocast forward + backward: output and every gradient finite; output against the fp32 forward
    (relative RMS, bound 5e-2; bf16 has 8 mantissa bits, so ~1e-2 is expected);
  * fp32 prefill of T - 8 tokens + 8 recurrent steps against the fp32 forward (bound 1e-3 rel-RMS:
    TF32 matmuls and a different summation order);
then greedy generation (prefill + steps) against recomputing the full forward for every token.
Exit status 1 if any check fails. Not collected by pytest (the name does not start with test_).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from rebased.config import MIXER_CONFIGS
from rebased.generate import generate
from rebased.mixers import make_mixer
from rebased.model import LanguageModel
from rebased.presets import tiny_hybrid
from rebased.testing import error_report

D_MODEL, LENGTH, BATCH, VOCAB = 256, 512, 4, 1024
OPTIONS = {
    "linear_attention": {"feature_map": "hedgehog", "num_heads": 8, "feature_dim": 16},
    "rebased": {"num_heads": 8, "feature_dim": 16},
    "based": {"num_heads": 8, "feature_dim": 16},
    "attention": {"num_heads": 4, "rotary": True},
    "sliding_window": {"num_heads": 4, "window": 64, "rotary": True},
    "hyena": {"max_len": LENGTH},
}


def check_mixer(name: str, device: str, label: str = "", **extra) -> list:
    torch.manual_seed(0)
    mixer = make_mixer(name, D_MODEL, **{**OPTIONS.get(name, {}), **extra}).to(device)
    x = torch.randn(BATCH, LENGTH, D_MODEL, device=device, requires_grad=True)
    start = time.perf_counter()
    with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16):
        y = mixer(x)
    y.float().square().mean().backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    grads_ok = all(p.grad is not None and torch.isfinite(p.grad).all() for p in [x, *mixer.parameters()])
    with torch.no_grad():
        reference = mixer(x)
        _, bf16_rel = error_report(y.float(), reference)
        head, state = mixer.prefill(x[:, :-8])
        steps = [head]
        for t in range(LENGTH - 8, LENGTH):
            y_t, state = mixer.step(x[:, t], state)
            steps.append(y_t[:, None])
        _, step_rel = error_report(torch.cat(steps, dim=1), reference)
    ok = bool(torch.isfinite(y).all()) and grads_ok and bf16_rel < 5e-2 and step_rel < 1e-3
    return [
        label or name,
        str(y.dtype).removeprefix("torch."),
        grads_ok,
        f"{bf16_rel:.1e}",
        f"{step_rel:.1e}",
        f"{seconds:.2f}",
        ok,
    ]


def check_generation(device: str) -> tuple[bool, str]:
    torch.manual_seed(0)
    model = LanguageModel(tiny_hybrid(d_model=128, vocab_size=VOCAB)).to(device).eval()
    with torch.no_grad():
        model.embedding.weight.normal_(std=1.0)
    prompts = [[int(t) for t in torch.randint(0, VOCAB, (n,))] for n in (5, 17, 9)]
    start = time.perf_counter()
    out = generate(model, prompts, 32, temperature=0.0)
    seconds = time.perf_counter() - start
    matches = []
    with torch.no_grad():
        for prompt, tokens in zip(prompts, out):
            ids = list(prompt)
            for _ in range(len(tokens)):
                ids.append(int(model(torch.tensor([ids], device=device))[0, -1].argmax()))
            matches.append(ids[len(prompt) :] == tokens)
    sampled = generate(model, prompts, 32, temperature=1.0, top_p=0.9, generator=torch.Generator(device).manual_seed(0))
    ok = all(matches) and all(len(t) == 32 for t in sampled)
    return ok, f"greedy == full-forward recompute per row: {matches}; 3 x 32 tokens in {seconds:.2f}s; sampling ran"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    device = parser.parse_args().device
    if device.startswith("cuda"):
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    header = ["mixer", "output dtype", "grads finite", "bf16 vs fp32", "prefill+steps vs fwd", "fwd+bwd s", "ok"]
    rows = []
    # backend "auto" takes the Triton kernels on CUDA where installed; "rebased[torch]" pins the torch ops. Mode
    # "auto" takes the parallel form at T 512, so "rebased[chunk]" reaches the chunk kernels through the mixer.
    runs = [(name, name, {}) for name in MIXER_CONFIGS] + [
        ("rebased", "rebased[torch]", {"backend": "torch"}),
        ("rebased", "rebased[chunk]", {"mode": "chunk"}),
    ]
    for name, label, extra in runs:
        try:
            rows.append(check_mixer(name, device, label, **extra))
        except Exception as error:  # report every mixer, not just the first failure
            rows.append([label, "-", "-", "-", "-", "-", f"FAILED: {type(error).__name__}: {error}"])
    print("| " + " | ".join(header) + " |")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")
    generation_ok, note = check_generation(device)
    print(f"generation: {'ok' if generation_ok else 'FAILED'}: {note}")
    all_ok = generation_ok and all(row[-1] is True for row in rows)
    print("ALL OK" if all_ok else "SOME CHECKS FAILED")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
