"""One optimizer step's records (what `Trainer.train_step` returns and what the ranks sum),
and the seeding of the RNGs."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class StepOutcome:
    """One optimizer step on this rank (`train_step`), before the sums over ranks."""

    loss_sum: torch.Tensor  # fp32 CE summed over this rank's targets
    global_targets: float  # target tokens of the step on all ranks
    lr: float
    grad_norm: float
    applied: bool  # the optimizer update was made
    loss_scale_overflow: bool = False  # fp16 loss scaling skipped it

    @property
    def empty(self) -> bool:
        return self.global_targets == 0


@dataclass
class StepTotals:
    """A step summed over ranks: what the metrics and the non-finite rule read."""

    loss: float  # global loss sum / global target count
    loss_sum: float  # the global loss sum (the log window's token-weighted mean adds these up)
    real_tokens: int
    sq_doc_lengths: int
    stop: bool  # a preemption signal reached some rank


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)
