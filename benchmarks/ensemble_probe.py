"""Probe: M MQAR models stacked into one batched module (torch.func.stack_module_state + vmap over
functional_call) against the same M models run one after another, forward+backward, on this machine.

    OMP_NUM_THREADS=2 python benchmarks/ensemble_probe.py        # CPU; on a GPU it uses cuda

Checks first that the stacked outputs equal each model's own. The base module passed to functional_call
must be a real one (on the device), not a meta copy: with a meta copy the outputs were 1.3 off and the
backward failed on a device mismatch.
"""

from __future__ import annotations

import time

import torch
from torch.func import functional_call, stack_module_state, vmap

from rebased.tasks.mqar.grids import MQARRun
from rebased.tasks.mqar.sweep import build_model

MEMBERS = 4


def probe(seq_len: int, batch: int, vocab: int, device: str) -> None:
    run = MQARRun("rebased", 64, seq_len, 4, 1e-3, vocab_size=vocab)
    models = []
    for seed in range(MEMBERS):
        torch.manual_seed(seed)
        models.append(build_model(run).to(device))
    params, buffers = stack_module_state(models)
    ids = torch.randint(0, vocab, (batch, seq_len), device=device)
    select = torch.rand(batch, seq_len, device=device) < 0.1

    def member(p, b, x):
        return functional_call(models[0], (p, b), (x,), {"select": select})

    stacked = vmap(member, in_dims=(0, 0, None), randomness="different")
    with torch.no_grad():
        for m in models:
            m.eval()
        out = stacked(params, buffers, ids)
        error = max((out[i] - m(ids, select=select)).abs().max().item() for i, m in enumerate(models))
        for m in models:
            m.train()
    print(f"L {seq_len}: stacked vs separate outputs, max abs difference {error:.1e}")

    def separate_step():
        for m in models:
            m(ids, select=select).float().square().mean().backward()

    def stacked_step():
        stacked(params, buffers, ids).float().square().mean().backward()

    for name, step in (("separate", separate_step), ("stacked", stacked_step)) * 2:
        step()  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        print(f"L {seq_len}: {MEMBERS} models {name}: {(time.perf_counter() - start) / 5 * 1e3:.1f} ms a step")


if __name__ == "__main__":
    torch.set_flush_denormal(True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    probe(32, 64, 64, device)
    probe(256, 64, 8192, device)
