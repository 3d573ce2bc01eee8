"""Learning rate: linear warm-up from lr/40, then cosine down to lr * min_lr_ratio.

The seed template's schedule (mmengine LinearLR start_factor=1/40 over warm_up_ratio of
training, then CosineAnnealingLR to eta_min = 0.15 lr), here as a pure function of the
optimizer step, so resuming needs nothing but the step number.
"""

from __future__ import annotations

import math

WARMUP_START_FACTOR = 1 / 40


def planned_steps(max_iters: int | None, max_epochs: int | None, steps_per_epoch: int) -> int:
    """Optimizer steps of a run: max_iters when set, else max_epochs whole epochs."""
    if max_iters is not None:
        return max_iters
    assert max_epochs is not None, "check_values requires max_epochs without max_iters"
    return max_epochs * steps_per_epoch


def lr_factor(step: int, total_steps: int, warm_up_ratio: float, min_lr_ratio: float) -> float:
    """Multiplier of the base lr used by optimizer step `step` (0-based) of `total_steps`."""
    warm = round(warm_up_ratio * total_steps)
    if step < warm:
        return WARMUP_START_FACTOR + (1 - WARMUP_START_FACTOR) * step / warm
    span = max(1, total_steps - warm)
    progress = min(1.0, (step - warm) / span)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupCosine:
    """Sets each param group's lr for the coming step; its state is the step counter."""

    def __init__(self, optimizer, total_steps: int, warm_up_ratio: float, min_lr_ratio: float):
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.warm_up_ratio, self.min_lr_ratio = warm_up_ratio, min_lr_ratio
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.step_num = 0
        self._apply()

    def _apply(self) -> None:
        f = lr_factor(self.step_num, self.total_steps, self.warm_up_ratio, self.min_lr_ratio)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self) -> None:
        self.step_num += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step": self.step_num, "base_lrs": list(self.base_lrs), "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step_num = int(state["step"])
        self._apply()
