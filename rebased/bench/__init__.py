"""Benchmarks behind `rebased bench`: every op checked against the float64 reference and timed on any
device (ops.py), and the GPU suite beside SDPA and flash-linear-attention (gpu_suite.py)."""
