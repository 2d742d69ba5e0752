"""Forward and backward of the fused chunk kernels at MQAR's L 2048 training shape, --runs times, nothing else:
the program a kernel profiler (benchmarks/fused_chunk_ncu.sh) wraps. Batch 512, 12 heads, q/k 16, v 5, bf16,
the ReBased kernel, as the MQAR step calls it; one forward (fused_chunk_fwd) and one backward (fused_chunk_dq,
fused_chunk_dkdv) a run.

    PYTHONPATH=. python benchmarks/fused_chunk_once.py [--runs 3] [--length 2048] [--value-dim 5]
"""

import argparse

import torch

from rebased.ops import DEFAULT_EPS, Polynomial
from rebased.ops.triton.fused_chunk import fused_chunk_linear_attention

HEADS, HEAD_DIM = 12, 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--value-dim", type=int, default=5)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only under TRITON_INTERPRET=1
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    shapes = [(args.batch, args.length, HEADS, d) for d in (HEAD_DIM, HEAD_DIM, args.value_dim)]
    q, k, v = (torch.randn(*shape, generator=generator).to(device, dtype).requires_grad_(True) for shape in shapes)
    kernel = Polynomial.rebased(HEAD_DIM)
    for _ in range(args.runs):
        o = fused_chunk_linear_attention(q, k, v, kernel=kernel, initial_state=None, output_final_state=False,
                                         normalize=True, eps=DEFAULT_EPS, chunk_size=64)[0]  # fmt: skip
        o.backward(torch.ones_like(o))
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"{args.runs} runs of the fused chunk op at B {args.batch}, L {args.length}, v {args.value_dim}: done")


if __name__ == "__main__":
    main()
