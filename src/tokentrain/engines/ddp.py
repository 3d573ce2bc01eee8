"""DistributedDataParallel: the local engine with the gradient all-reduce of DDP.

DDP *averages* gradients over the world, but the loss we want is the sum over all ranks'
tokens divided by the global target count, so each rank back-propagates
``world_size * loss_sum / global_count`` (`loss_scale`). Gradients are all-reduced on the
last micro-batch of a step only (`no_sync` before). Checkpoints: the plain format.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from tokentrain.engines.base import Collectives
from tokentrain.engines.local import LocalEngine, owns_checkpoint, read_model_state, safe_globals

__all__ = ["DDPEngine", "owns_checkpoint", "read_model_state", "safe_globals"]


class DDPEngine(Collectives, LocalEngine):
    name = "ddp"

    def __init__(self, env):
        super().__init__(env)
        from tokentrain.distributed.env import ensure_process_group

        ensure_process_group(env)  # --engine ddp in one process: a 1-rank group

    def prepare(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        self.inner = module
        self.module = DDP(module, device_ids=device_ids, **no_buffer_sync(DDP))
        self.optimizer = optimizer
        return self.module

    @property
    def unwrapped(self) -> nn.Module:
        return self.inner

    @property
    def loss_scale(self) -> float:
        return float(self.env.world_size)

    def accumulate(self, is_last: bool):
        if is_last:
            return contextlib.nullcontext()
        from torch.nn.parallel import DistributedDataParallel as DDP

        assert isinstance(self.module, DDP), "prepare() first"
        return self.module.no_sync()


def no_buffer_sync(ddp_class) -> dict:
    """DDP's keyword for "no buffer broadcast before each forward" in the installed torch: newer
    releases name it `forward_sync_buffers` and warn (once per rank) on the old
    `broadcast_buffers`, which older ones (2.11) only know. The buffers (rotary tables) are
    the same on every rank by construction; the one sync at init either keyword keeps is harmless."""
    import inspect

    if "forward_sync_buffers" in inspect.signature(ddp_class.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}
