"""What the Triton kernel test modules share: what each does first (skip without triton, and pick the device the
kernels run on: CUDA, or CPU tensors under TRITON_INTERPRET=1, which tests/conftest.py sets when there is no
CUDA), and the CUDA-graph capture their gpu tests replay (replayed: a replay on new inputs beside an eager call)."""

import os

import pytest
import torch


def device_or_skip() -> str:
    """'cuda' or 'cpu'; skips the calling module (at its import) when triton is missing, or when there is no
    CUDA and TRITON_INTERPRET is not 1 (the kernels could not run)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)
    return "cpu"


def captured(step):
    """step() once eagerly (Triton compiles outside the capture), then captured as a CUDA graph on a side stream:
    (the graph, the outputs its replays write)."""
    step()
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        outputs = step()
    torch.cuda.current_stream().wait_stream(stream)
    return graph, outputs


def replayed(step, inputs, new_inputs):
    """step() captured as a CUDA graph, then its inputs overwritten with new_inputs and the graph replayed once:
    (what the replay wrote, what an eager step() gives on the new inputs), for the tests to hold equal."""
    graph, outputs = captured(step)
    with torch.no_grad():
        for old, new in zip(inputs, new_inputs):
            old.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    return outputs, step()
