"""Which value dims does the compiled Triton chunk mode handle? One subprocess per case, run in parallel,
since an illegal memory access poisons the CUDA context. Prints one line per case: "fwd ok" / "ok" plus
errors against the torch backend, or the failure.

    python benchmarks/triton_shapes_gpu.py
"""

import os
import subprocess
import sys

CHILD = """
import sys, torch
from rebased.ops import linear_attention, Polynomial
B, V = int(sys.argv[1]), int(sys.argv[2])
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


def main() -> None:
    cases = [(b, v) for b in (64, 512) for v in (5, 8, 16, 21, 32, 64)]
    env = {"CUDA_LAUNCH_BLOCKING": "1", **os.environ}
    procs = [
        (case, subprocess.Popen([sys.executable, "-c", CHILD, *map(str, case)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env))
        for case in cases
    ]  # fmt: skip
    for (batch, value_dim), proc in procs:
        try:
            out, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            out = "timeout"
        lines = [line for line in (out or "no output").splitlines() if line.strip()] or ["no output"]
        status = lines[-1] if lines[-1].startswith("ok") else " | ".join(lines[-2:])
        print(f"B={batch:4d} V={value_dim:3d}: {status[-200:]}", flush=True)


if __name__ == "__main__":
    main()
