"""The optimizer the trainer built, moved onto the parameters an engine actually steps: FSDP2's
shards, or the fp32 masters of `mixed_precision = 'params'` (engines/mixed_precision.py)."""

from __future__ import annotations

import inspect

import torch


def rebuild_optimizer(optimizer: torch.optim.Optimizer, new_for: dict[int, torch.Tensor]) -> torch.optim.Optimizer:
    """The same optimizer (class, hyperparameters per param group) over ``new_for[id(p)]`` in
    place of each of its parameters `p` (unlisted ones stay); itself when nothing changes."""
    if all(new_for.get(id(p), p) is p for g in optimizer.param_groups for p in g["params"]):
        return optimizer
    if optimizer.state:
        raise RuntimeError("an optimizer with state cannot be moved onto other parameters; prepare() before training")
    new_groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [new_for.get(id(p), p) for p in g["params"]]}
        for g in optimizer.param_groups
    ]
    accepted = inspect.signature(type(optimizer).__init__).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    return type(optimizer)(new_groups, **defaults)
