"""DistributedDataParallel: the local engine with the gradient all-reduce of DDP.

DDP *averages* gradients over the world, but the loss we want is the sum over all ranks'
tokens divided by the global target count, so each rank back-propagates
``world_size * loss_sum / global_count`` (`loss_scale`). Gradients are all-reduced on the
last micro-batch of a step only (`no_sync` before). Checkpoints: the plain format.

`mixed_precision = 'params'` (engines/mixed_precision.py): the module computes with bf16
parameters, each micro-batch's gradients are accumulated into fp32 master gradients on the
fly, and after the step's last backward one fp32 all-reduce sums them over the ranks (no
DDP wrapper: its reducer would all-reduce the bf16 gradients, and only the last
micro-batch's). The sum needs no averaging to undo, so `loss_scale` is 1 there.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from tokentrain.engines.base import Collectives
from tokentrain.engines.local import LocalEngine
from tokentrain.engines.plain_checkpoint import owns_checkpoint, read_model_state, safe_globals

__all__ = ["DDPEngine", "owns_checkpoint", "read_model_state", "safe_globals"]


class DDPEngine(Collectives, LocalEngine):
    name = "ddp"

    def __init__(self, env, compute_dtype: torch.dtype | None = None, mixed_precision: str = "autocast"):
        super().__init__(env, compute_dtype, mixed_precision)
        from tokentrain.distributed.env import ensure_process_group

        ensure_process_group(env)  # --engine ddp in one process: a 1-rank group

    def prepare(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        self.inner = module
        self.optimizer = self._hold_masters(module, optimizer)
        if self.masters is not None:  # what DDP's constructor does: every rank starts from rank 0's weights
            for m in self.masters.masters:
                dist.broadcast(m.data, src=0)
            self.masters.refresh()
            self.module = module
        else:
            self.module = DDP(module, device_ids=device_ids, **no_buffer_sync(DDP))
        return self.module

    def reduce_master_grads(self, flat: torch.Tensor) -> None:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)

    @property
    def unwrapped(self) -> nn.Module:
        return self.inner

    @property
    def loss_scale(self) -> float:
        """DDP averages over the ranks (undone by the world size); 'params' sums them."""
        return 1.0 if self.masters is not None else float(self.env.world_size)

    def accumulate(self, is_last: bool):
        if is_last or self.masters is not None:  # 'params': reduced once, in step()
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
