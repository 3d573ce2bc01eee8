"""The seam between the trainer and an engine: every member the trainer uses, typed.

An engine is one process (`local`), DistributedDataParallel (`ddp`), DeepSpeed ZeRO
(`deepspeed`) or FSDP2 (`fsdp2`). The loss rule (token sum / global target count) is the
trainer's and never changes; an engine only says by how much the loss must be scaled so
that its gradient reduction produces that rule (`loss_scale`).

Each engine also owns its checkpoint format: what `save(folder)` writes, `load(folder)`
reads back, `read_model_state(folder)` (a module-level function of the engine's module,
used by `convert` without a process group) and the pickled globals its `.pt` files may hold
(`safe_globals()`, checked before anything is loaded). Which engine writes which format, and
whether its checkpoints move to another world size, is its row in `engines/specs.py`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from tokentrain.model.lm import ShardHook


@dataclass(frozen=True)
class StepResult:
    """What `Engine.step` did: the global gradient norm (before clipping) and whether the
    optimizer update was applied (never with a non-finite norm). `loss_scale_overflow`: fp16
    dynamic loss scaling skipped it (expected now and then; not a divergence)."""

    grad_norm: float
    applied: bool
    loss_scale_overflow: bool = False


@runtime_checkable
class Engine(Protocol):
    name: str  # its row in engines/specs.py:SPECS

    optimizer: Any  # the optimizer the engine steps (FSDP2 rebuilds it over its shards, 'params' over fp32 masters)

    # How parameters meet the compute dtype: 'fp32' (no compute dtype), 'autocast' (fp32
    # parameters, cast per op) or 'params' (compute-dtype parameters, fp32 masters in the
    # optimizer, fp32 gradient reduction); resolved from the config by engines/mixed_precision.py.
    mixed_precision: str

    @classmethod
    def create(cls, cfg, env, deepspeed: dict | None, compute_dtype: torch.dtype | None) -> Engine:
        """The engine of a run from its config (`deepspeed`: the DeepSpeed JSON, "auto" values
        unresolved; `compute_dtype`: resolved once by the trainer)."""

    @property
    def description(self) -> str:
        """One line for the log: the engine and how it runs (ZeRO stage, ranks, offload)."""

    @property
    def stage(self) -> int | None:
        """The DeepSpeed ZeRO stage; None for the other engines (recorded in checkpoints)."""

    @property
    def shard_hook(self) -> ShardHook | None:
        """What the model builder (`model/lm.py:load_model`, the same for every engine) hands the
        freshly built model to instead of moving it to the device: FSDP2 shards it (see
        `ShardHook` there); None: whole on the device (ZeRO-3's zero.Init partitions it itself)."""

    @property
    def partitioned_params(self) -> bool:
        """True when a forward needs every rank (parameters gathered on the fly: ZeRO-3, FSDP)."""

    @property
    def unwrapped(self) -> nn.Module:
        """The CausalLMWithLoss module, without the engine's wrapper."""

    @property
    def loss_scale(self) -> float:
        """Factor on ``loss_sum / global_count`` so the engine's gradient reduction yields the rule."""

    def prepare(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module: ...

    def accumulate(self, is_last: bool) -> contextlib.AbstractContextManager: ...

    def forward(self, *args) -> torch.Tensor: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, max_norm: float) -> StepResult: ...

    def zero_grad(self) -> None: ...

    def gradients(self) -> list[torch.Tensor]:
        """The gradients the next `step` reads, as this engine holds them (the fault tests poison
        one); empty where DeepSpeed keeps them in its own flat buffers."""

    def full_parameters(self, module: nn.Module | None = None) -> contextlib.AbstractContextManager: ...

    def all_reduce_sum(self, values: list[float]) -> list[float]: ...

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` (picklable), on every rank: what one rank decided (the checkpoint to resume)."""

    def barrier(self) -> None: ...

    def save(self, folder: Path) -> None: ...

    def load(self, folder: Path) -> None: ...


class Collectives:
    """`all_reduce_sum`, `broadcast_object` and `barrier` over the default process group: the
    same for every engine that runs with ranks (ddp, deepspeed, fsdp2; a 1-rank group included)."""

    env: Any

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.env.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)  # on NCCL, through the current CUDA device
        return box[0]

    def barrier(self) -> None:
        dist.barrier()
