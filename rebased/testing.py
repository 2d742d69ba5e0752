"""Comparison helpers for tests: report max-abs and relative-RMS error, never just 'not close'."""

from __future__ import annotations

import torch
from torch import Tensor


def error_report(actual: Tensor, expected: Tensor) -> tuple[float, float]:
    """(max absolute error, relative RMS error) of actual against expected, computed in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    diff = actual - expected
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    scale = expected.square().mean().sqrt().item() if expected.numel() else 0.0
    rel_rms = diff.square().mean().sqrt().item() / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return max_abs, rel_rms


def assert_close(actual: Tensor, expected: Tensor, *, rel_rms: float, atol: float = 0.0, name: str = "") -> None:
    """Fail unless the relative RMS error is within rel_rms, or every element is within atol.

    atol covers an expected value that is ~0 (a gradient that vanishes exactly, say), where a relative
    error means nothing. NaN or Inf in `actual` always fails, whatever the tolerances.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        raise AssertionError(f"{name}: contains NaN or Inf")
    got_abs, got_rel = error_report(actual, expected)
    if got_rel > rel_rms and got_abs > atol:
        bound = f"rel-RMS <= {rel_rms:g}" + (f" or max-abs <= {atol:g}" if atol else "")
        raise AssertionError(f"{name}: max-abs {got_abs:.3e}, rel-RMS {got_rel:.3e} (wanted {bound})")


def per_position_relative_error(actual: Tensor, expected: Tensor) -> Tensor:
    """||actual_t - expected_t|| / ||expected_t|| for each time step t of [B, T, H, *] tensors: [T], float64.

    Where the exact value vanishes (dq at t = 0 without a state, since o_0 = v_0 whatever q_0 is), a
    relative error means nothing: such positions are judged against 1% of the typical per-position norm.
    """
    diff = (actual.detach().double() - expected.detach().double()).square().sum((0, 2, 3)).sqrt()
    norm = expected.detach().double().square().sum((0, 2, 3)).sqrt()
    floor = 1e-2 * norm.square().mean().sqrt()
    return diff / norm.clamp_min(floor.clamp_min(1e-300))
