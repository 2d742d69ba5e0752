"""Which (value dim, launch config) pairs does the compiled Triton chunk kernel handle? One subprocess per
case, run in parallel, since an illegal memory access poisons the CUDA context. Prints one line per case:
"fwd ok" / "ok" plus errors against the torch backend, or the failure.

    python benchmarks/triton_shapes_gpu.py            # the configs pick_config chooses
    python benchmarks/triton_shapes_gpu.py --variants # also pinned (forward, backward) configs, to find the crash
"""

import os
import subprocess
import sys

CHILD = """
import sys, torch
from rebased.ops import linear_attention, Polynomial
from rebased.ops.triton import functions as F
B, V, variant = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if variant != "default":  # "fwdT,fwdV,fwdW/bwdT,bwdV,bwdW"
    fwd, bwd = (F.Config(*map(int, part.split(","))) for part in variant.split("/"))
    F.CONFIG_OVERRIDE = (fwd, bwd)
g = torch.Generator(device="cuda").manual_seed(0)
q, k = (torch.randn(B, 128, 12, 16, device="cuda", generator=g).bfloat16().requires_grad_() for _ in range(2))
v = torch.randn(B, 128, 12, V, device="cuda", generator=g).bfloat16().requires_grad_()
kern = Polynomial.rebased(16)
rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
o, _ = linear_attention(q, k, v, kernel=kern, backend="triton")
o2, _ = linear_attention(q, k, v, kernel=kern, backend="torch")
torch.cuda.synchronize()
print(f"fwd ok o {rel(o, o2):.1e}", flush=True)
dq, dv = torch.autograd.grad(o.float().square().sum(), (q, v))
dq2, dv2 = torch.autograd.grad(o2.float().square().sum(), (q, v))
torch.cuda.synchronize()
print(f"ok o {rel(o, o2):.1e} dq {rel(dq, dq2):.1e} dv {rel(dv, dv2):.1e}")
"""

VARIANTS = ["64,16,8/32,16,8", "64,32,8/32,32,8", "64,16,4/32,16,4", "64,32,8/32,16,8", "64,16,8/32,32,8"]


def main() -> None:
    cases = [(b, v, "default") for b in (64, 512) for v in (5, 8, 16, 21, 32, 64)]
    if "--variants" in sys.argv:  # the crashing value dims, under pinned configs
        cases += [(64, v, variant) for variant in VARIANTS for v in (5, 8, 16)]
    env = {"CUDA_LAUNCH_BLOCKING": "1", **os.environ}
    procs = [
        (case, subprocess.Popen([sys.executable, "-c", CHILD, *map(str, case)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env))
        for case in cases
    ]  # fmt: skip
    for (batch, value_dim, variant), proc in procs:
        try:
            out, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            out = "timeout"
        lines = [line for line in (out or "no output").splitlines() if line.strip()] or ["no output"]
        status = lines[-1] if lines[-1].startswith("ok") else " | ".join(lines[-2:])
        print(f"{variant:18s} B={batch:4d} V={value_dim:3d}: {status[-200:]}", flush=True)


if __name__ == "__main__":
    main()
