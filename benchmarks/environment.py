"""The line a benchmark prints first: the device, torch and triton. Scripts here import it as `environment`
(benchmarks/ is on the path when one of them runs)."""

import torch


def versions(device: str = "cuda") -> str:
    """'<GPU name>; torch <version>; triton <version>'; off CUDA (a bench's logic under the interpreter) the
    device's name in place of the GPU's."""
    import triton  # only here: the module imports on a machine without it

    name = torch.cuda.get_device_name() if device == "cuda" else device
    return f"{name}; torch {torch.__version__}; triton {triton.__version__}"
