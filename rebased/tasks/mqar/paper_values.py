"""The paper's MQAR numbers (ReBased, Aksenov et al., ACL 2024, arXiv 2402.10644; docs/paper.md), to set
ours beside.

FIG1: approximate values read off Fig. 1 (best lr, mean over 5 seeds), by (model, L) -> d_model -> accuracy.
TABLE1: the kernel ablation (32 pairs, mean over 5 seeds), by (kernel, L) -> d_model -> accuracy; kernel
names are the MQAR model names of rebased.tasks.mqar.grids.ABLATION_KERNELS.
"""

from __future__ import annotations

_FIG1_D = (64, 128, 256, 512)
_FIG1 = {
    "rebased": {128: (1.0, 1.0, 1.0, 1.0), 256: (0.97, 1.0, 1.0, 1.0), 512: (0.89, 0.99, 1.0, 1.0),
                1024: (0.55, 0.98, 1.0, 1.0), 2048: (0.07, 0.66, 0.98, 1.0)},
    "based": {128: (1.0, 1.0, 1.0, 1.0), 256: (0.99, 1.0, 1.0, 1.0), 512: (0.89, 0.99, 1.0, 1.0),
              1024: (0.33, 0.98, 1.0, 1.0), 2048: (0.14, 0.48, 0.99, 1.0)},
    "mamba": {128: (0.73, 0.77, 0.99, 0.98), 256: (0.09, 0.12, 0.19, 0.34), 512: (0.0, 0.02, 0.39, 0.20),
              1024: (0.0, 0.0, 0.0, 0.17), 2048: (0.0, 0.0, 0.0, 0.0)},
    "attention": {length: (1.0, 1.0, 1.0, 1.0) for length in (128, 256, 512, 1024, 2048)},
}  # fmt: skip
FIG1: dict[tuple[str, int], dict[int, float]] = {
    (model, length): dict(zip(_FIG1_D, values)) for model, rows in _FIG1.items() for length, values in rows.items()
}

_TABLE1_D = (16, 24, 32, 48)
_TABLE1 = {
    "based": {256: (0.06, 0.45, 0.82, 0.99), 2048: (0.02, 0.40, 0.66, 0.99)},
    "square": {256: (0.05, 0.47, 0.64, 0.99), 2048: (0.03, 0.33, 0.46, 0.93)},
    "norm_square": {256: (0.09, 0.39, 0.84, 0.97), 2048: (0.05, 0.56, 0.72, 0.99)},
    "gamma_square": {256: (0.02, 0.35, 0.71, 0.98), 2048: (0.02, 0.26, 0.65, 0.99)},
    "affine_square": {256: (0.06, 0.51, 0.89, 0.99), 2048: (0.06, 0.50, 0.85, 0.99)},
    "rebased": {256: (0.09, 0.59, 0.86, 0.99), 2048: (0.04, 0.58, 0.83, 0.99)},
}  # fmt: skip
TABLE1: dict[tuple[str, int], dict[int, float]] = {
    (kernel, length): dict(zip(_TABLE1_D, values))
    for kernel, rows in _TABLE1.items()
    for length, values in rows.items()
}

PAPER_VALUES = {"paper-fig1": FIG1, "paper-ablation": TABLE1}
CLOSE = 0.05  # summary.md flags a cell whose difference from the paper is larger than this
