"""rebased: linear-attention language models with learnable kernels (ReBased, Based and their baselines).

Importing the package loads torch and the pure-torch ops only: no Triton, no network, no output.
"""

from rebased.feature_maps import FEATURE_MAPS, FeatureMap, make_feature_map
from rebased.ops import (
    DEFAULT_EPS,
    LinearAttentionState,
    Polynomial,
    linear_attention,
    linear_attention_reference,
    linear_attention_step,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_EPS",
    "FEATURE_MAPS",
    "FeatureMap",
    "LinearAttentionState",
    "Polynomial",
    "__version__",
    "linear_attention",
    "linear_attention_reference",
    "linear_attention_step",
    "make_feature_map",
]
