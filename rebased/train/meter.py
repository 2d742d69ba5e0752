"""What the training loop reports besides the loss: tokens/s and model FLOPs utilisation, measured over windows
of steps (the progress bar's, and the metrics rows')."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Meter:
    """What one optimizer step is worth, for the progress bar and the metrics: tokens/s, and model FLOPs
    utilisation where the FLOPs of a step and the hardware's peak are known."""

    tokens_per_step: int
    flops_per_step: float = 0.0
    peak_flops: float = 0.0  # the devices' peak FLOP/s, all ranks together; 0: MFU not shown

    def rates(self, steps: int, seconds: float) -> dict[str, float]:
        tokens_per_s = steps * self.tokens_per_step / max(seconds, 1e-9)
        rates = {"tokens_per_s": tokens_per_s}
        if self.flops_per_step and self.peak_flops:
            rates["mfu"] = steps * self.flops_per_step / max(seconds, 1e-9) / self.peak_flops
        return rates


class RateWindows:
    """Rates over named windows of steps: each reading covers the steps since that window's last reading."""

    def __init__(self, meter: Meter | None):
        self.meter = meter
        self.windows: dict[str, tuple[int, float]] = {}  # (step, time) where each window began

    def read(self, step: int, window: str) -> dict[str, float]:
        """tokens/s (and MFU) over the steps since this window's last reading; {} without a meter or steps."""
        now = time.perf_counter()
        began_step, began = self.windows.get(window, (step, now))
        self.windows[window] = (step, now)
        if self.meter is None or step == began_step:
            return {}
        return {name: round(value, 4) for name, value in self.meter.rates(step - began_step, now - began).items()}

    def restart(self, step: int) -> None:
        """Evaluating is not training: every window starts again after it."""
        self.windows = dict.fromkeys(("bar", "metrics"), (step, time.perf_counter()))

    def text(self, step: int) -> dict[str, str]:
        """The progress bar's reading, formatted."""
        rates = self.read(step, "bar")
        text = {"tok/s": f"{rates['tokens_per_s']:,.0f}"} if rates else {}
        if "mfu" in rates:
            text["mfu"] = f"{100 * rates['mfu']:.1f}%"
        return text
