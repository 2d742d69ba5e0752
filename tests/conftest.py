"""Session settings for the parallel run (pyproject's addopts: pytest-xdist, `-n auto`).

Workers: one per core this process may use (CPU affinity and a cgroup CPU quota both count), at most
MAX_WORKERS, so that a large machine does not start dozens of processes that each import torch and fill
their own Triton interpreter caches (some 0.5 GB apiece) for a suite of a few minutes.

Threads: the workers already keep every core busy, so each runs torch on one intra-op thread (torch's
default, a thread per core in every worker, would oversubscribe the cores). OMP_NUM_THREADS=1 carries the
same limit into the processes a test starts without setting their threads.

Triton: without CUDA the kernel tests run under TRITON_INTERPRET=1, which Triton reads once, when it is
first imported; a worker may import it early and indirectly (transformers does), so the variable is set here,
before any test module is collected.
"""

from __future__ import annotations

import os
from pathlib import Path

MAX_WORKERS = 4


def available_cores() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:  # cgroup v2 quota, "max 100000" or "200000 100000": a container limited to 2 CPUs of a large host
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cores


def pytest_xdist_auto_num_workers(config) -> int:
    return max(1, min(MAX_WORKERS, available_cores()))


def pytest_configure(config) -> None:
    """In each process that runs tests: an xdist worker, or pytest itself without xdist (the controller of a
    parallel run runs none, so it need not import torch)."""
    worker = hasattr(config, "workerinput")
    if not worker and config.pluginmanager.hasplugin("xdist") and config.getoption("numprocesses", None):
        return
    import torch

    if worker:
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
