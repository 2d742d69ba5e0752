"""Which (batch, value dim) shapes does the Triton chunk kernel handle? One subprocess per shape, since an
illegal memory access poisons the CUDA context. Prints one line per shape: ok + errors against torch, or the failure.

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
o, _ = linear_attention(q, k, v, kernel=kern, backend="triton")
dq, = torch.autograd.grad(o.float().square().sum(), (q,))
o2, _ = linear_attention(q, k, v, kernel=kern, backend="torch")
dq2, = torch.autograd.grad(o2.float().square().sum(), (q,))
torch.cuda.synchronize()
rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
print(f"ok o {rel(o, o2):.1e} dq {rel(dq, dq2):.1e}")
"""

for batch in (64, 512):
    for value_dim in (5, 8, 16, 21, 32, 64):
        run = subprocess.run(
            [sys.executable, "-c", CHILD, str(batch), str(value_dim)],
            capture_output=True,
            text=True,
            env={"CUDA_LAUNCH_BLOCKING": "1", **os.environ},
            timeout=120,
        )
        lines = (run.stdout.strip() or run.stderr.strip() or "no output").splitlines()
        last = lines[-1]
        print(f"B={batch:4d} V={value_dim:3d}: {last[-160:]}", flush=True)
