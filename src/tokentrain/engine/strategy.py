"""How one optimizer step's gradients are produced, reduced and applied: the seam for engines.

The trainer only ever says: here are the micro-batches of a step (`accumulate`), here
is a loss to differentiate (`backward`), now apply the step (`step`), sum this number
over ranks (`all_reduce_sum`), save / load your state. `LocalStrategy` is one process;
`DDPStrategy` wraps the module in DistributedDataParallel and skips the gradient
all-reduce on all but the last micro-batch (`no_sync`). A DeepSpeed strategy plugs in
behind the same five calls; the loss rule (token sum / global target count) lives in
the trainer and does not change.

Loss scaling across ranks: DDP *averages* gradients over the world, but the loss we
want is the sum over all ranks' tokens divided by the global target count, so each rank
back-propagates ``world_size * loss_sum / global_count`` (see `loss_scale`).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


class LocalStrategy:
    name = "local"
    partitioned_params = False  # True when a forward needs every rank (ZeRO-3)

    def __init__(self, env):
        self.env = env
        self.module: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    # -------------------------------------------------------------- setup
    def prepare(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        self.module, self.optimizer = module, optimizer
        return module

    @property
    def unwrapped(self) -> nn.Module:
        """The CausalLMWithLoss module (not the DDP wrapper)."""
        return self.module

    # -------------------------------------------------------------- one step
    @property
    def loss_scale(self) -> float:
        return 1.0

    def accumulate(self, is_last: bool):
        return contextlib.nullcontext()

    def forward(self, *args):
        return self.module(*args)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_norm: float) -> float:
        """Clip (if max_norm > 0), apply and clear the gradients; return the global grad norm."""
        params = [p for p in self.unwrapped.parameters() if p.grad is not None]
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            norm = (
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
                if params
                else torch.zeros(())
            )
        norm = float(norm)
        if math.isfinite(norm):  # a NaN/inf gradient would poison the weights and the Adam moments
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def full_parameters(self, module=None):
        """Whole parameters for the duration (a sharding engine gathers them; here: as is)."""
        yield

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return list(values)

    def barrier(self) -> None:
        pass

    # -------------------------------------------------------------- state
    def save(self, folder: Path) -> None:
        """Model weights (safetensors) and optimizer state; only the main rank writes here."""
        if not self.env.is_main:
            return
        from safetensors.torch import save_model

        save_model(self.unwrapped.model, str(folder / MODEL_FILE))
        torch.save(self.optimizer.state_dict(), folder / OPTIMIZER_FILE)

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_model

        load_model(self.unwrapped.model, str(folder / MODEL_FILE), strict=True, device=str(self.env.device))
        state = torch.load(folder / OPTIMIZER_FILE, map_location=self.env.device, weights_only=True)
        self.optimizer.load_state_dict(state)


class DDPStrategy(LocalStrategy):
    name = "ddp"

    def prepare(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        self.inner = module
        self.module = DDP(module, device_ids=device_ids, broadcast_buffers=False)
        self.optimizer = optimizer
        return self.module

    @property
    def unwrapped(self) -> nn.Module:
        return self.inner

    @property
    def loss_scale(self) -> float:
        return float(self.env.world_size)

    def accumulate(self, is_last: bool):
        return contextlib.nullcontext() if is_last else self.module.no_sync()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.env.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def barrier(self) -> None:
        dist.barrier()


def make_strategy(env) -> LocalStrategy:
    return DDPStrategy(env) if env.distributed else LocalStrategy(env)
