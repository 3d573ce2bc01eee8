"""What one log line summarises: the steps since the last one.

The logged ``loss`` is the window's token-weighted mean (sum of the steps' CE sums over the
sum of their target counts), so a line every 100 steps describes those 100 steps, not the
last one; ``loss_last`` keeps the last step's own value. Throughput excludes evaluation and
checkpoint time (``reset_clock``).
"""

from __future__ import annotations

import math
import time

import torch


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Window:
    def __init__(self):
        self.start = time.perf_counter()
        self.steps = 0
        self.step_time = self.data_time = 0.0
        self.tokens = self.targets = 0
        self.flops = 0.0
        self.paused = 0.0
        self.loss_sum = 0.0  # summed CE of the finite steps
        self.loss_targets = 0  # their target tokens
        self.last_loss = math.nan

    def add(self, step_time, data_time, tokens, targets, flops, loss_sum: float = 0.0) -> None:
        self.steps += 1
        self.step_time += step_time
        self.data_time += data_time
        self.tokens += tokens
        self.targets += targets
        self.flops += flops
        self.last_loss = loss_sum / targets if targets else 0.0
        if math.isfinite(loss_sum) and targets:  # a skipped non-finite step is reported on its own line
            self.loss_sum += loss_sum
            self.loss_targets += targets
        self.last = time.perf_counter()

    @property
    def mean_loss(self) -> float:
        """Token-weighted mean loss of the window's finite steps (the last step's value when none is)."""
        return self.loss_sum / self.loss_targets if self.loss_targets else self.last_loss

    def reset_clock(self) -> None:
        """Drop the time spent since the last step (evaluation, checkpoint) from the window."""
        self.paused += time.perf_counter() - getattr(self, "last", self.start)

    @property
    def wall(self) -> float:
        return getattr(self, "last", time.perf_counter()) - self.start - self.paused

    def summary(self, world_size: int, peak_tflops: float | None) -> dict:
        """tokens/s, mean step and data time, TFLOP/s per device and MFU; {} for no steps."""
        if not self.steps:
            return {}
        wall = max(self.wall, 1e-9)
        tflops = self.flops / wall / 1e12 / world_size
        return dict(
            tokens_per_s=self.tokens / wall,
            step_time=self.step_time / self.steps,
            data_time=self.data_time / self.steps,
            tflops=tflops,
            mfu=(tflops / peak_tflops) if peak_tflops else None,
        )
