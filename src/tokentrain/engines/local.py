"""One process: the module as it is, plain backward, clip and AdamW step.

`mixed_precision = 'params'` (engines/mixed_precision.py): the module computes with bf16
parameters and the optimizer steps their fp32 masters (`MasterWeights`); 'autocast': fp32
parameters, autocast in the forward.

Checkpoint format "plain": ``model.safetensors`` (fp32 weights of the HF model: the masters)
and ``optimizer.pt`` (the optimizer state dict, tensors and plain containers only). The same
files at any world size and in either mode: a plain checkpoint resumes on any number of ranks.
`load` also reads an FSDP2 (DCP) checkpoint of any world size, whole, the optimizer state moved
by parameter name; FSDP2 reads these files the same way (`fsdp2_checkpoint.load_plain`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokentrain.engines.base import StepResult
from tokentrain.engines.mixed_precision import MasterWeights, describe, resolve_mode
from tokentrain.engines.optimizer import rebuild_optimizer
from tokentrain.engines.plain_checkpoint import MODEL_FILE, OPTIMIZER_FILE, owns_checkpoint

log = logging.getLogger(__name__)


def grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """The global L2 norm of the gradients; clipped in place to `max_norm` when > 0."""
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    if not params:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))


class LocalEngine:
    name = "local"

    stage: int | None = None  # DeepSpeed's ZeRO stage; none here

    def __init__(self, env, compute_dtype: torch.dtype | None = None, mixed_precision: str = "autocast"):
        self.env = env
        self.compute_dtype = compute_dtype
        self.mixed_precision = mixed_precision if compute_dtype is not None else "fp32"
        self.module: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.masters: MasterWeights | None = None  # 'params': the fp32 masters of the module's bf16 parameters

    @classmethod
    def create(cls, cfg, env, deepspeed: dict | None, compute_dtype: torch.dtype | None):
        return cls(env, compute_dtype, resolve_mode(cfg.mixed_precision, cls.name, compute_dtype))

    @property
    def description(self) -> str:
        return f"{self.name}, {describe(self.mixed_precision, self.compute_dtype)}"

    @property
    def shard_hook(self) -> None:
        """The model whole on the device (DDP and DeepSpeed too: ZeRO-3's zero.Init partitions it
        as transformers builds it)."""
        return None

    @property
    def partitioned_params(self) -> bool:
        """Whole parameters on every rank (a property: DeepSpeed's answer depends on its stage)."""
        return False

    # -------------------------------------------------------------- setup
    def prepare(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        self.module, self.optimizer = module, self._hold_masters(module, optimizer)
        return module

    def _hold_masters(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """'params': the module's parameters to the compute dtype, the optimizer over fp32 masters."""
        if self.mixed_precision != "params":
            return optimizer
        assert self.compute_dtype is not None, "resolve_mode gives 'params' only with a compute dtype"
        self.masters = MasterWeights(module, self.compute_dtype)
        return rebuild_optimizer(optimizer, self.masters.replacements())

    @property
    def unwrapped(self) -> nn.Module:
        assert self.module is not None, "prepare() first"
        return self.module

    @property
    def _optimizer(self) -> torch.optim.Optimizer:
        assert self.optimizer is not None, "prepare() first"
        return self.optimizer

    def _hf_model(self) -> nn.Module:
        """The HF model inside the loss module (its state is what checkpoints hold)."""
        model = self.unwrapped.model
        assert isinstance(model, nn.Module)
        return model

    # -------------------------------------------------------------- one step
    @property
    def loss_scale(self) -> float:
        return 1.0

    def accumulate(self, is_last: bool):
        return contextlib.nullcontext()

    def forward(self, *args):
        assert self.module is not None, "prepare() first"
        return self.module(*args)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_norm: float) -> StepResult:
        """Clip (if max_norm > 0), apply and clear the gradients. A non-finite norm applies
        nothing: it would poison the weights and the Adam moments. 'params': on the fp32
        masters (their gradients reduced first: `reduce_master_grads`), then copied into the
        compute parameters."""
        if self.masters is not None:
            self.reduce_master_grads(self.masters.flat_grad)
            params = self.masters.attach_grads()
        else:
            params = [p for p in self.unwrapped.parameters() if p.grad is not None]
        norm = grad_norm(params, max_norm)
        applied = math.isfinite(norm)
        if applied:
            self._optimizer.step()
            if self.masters is not None:
                self.masters.refresh()
        self.zero_grad()
        return StepResult(norm, applied)

    def reduce_master_grads(self, flat: torch.Tensor) -> None:
        """The fp32 gradients of all masters, one flat buffer, summed over ranks: one process, as is."""

    def zero_grad(self) -> None:
        self._optimizer.zero_grad(set_to_none=True)
        if self.masters is not None:
            self.masters.zero_grad()

    def gradients(self) -> list[torch.Tensor]:
        """'params': the fp32 master gradients (the compute parameters' are dropped once added)."""
        if self.masters is not None:
            return list(self.masters.grads)
        return [p.grad for p in self.unwrapped.parameters() if p.grad is not None]

    @contextlib.contextmanager
    def full_parameters(self, module=None):
        """Whole parameters for the duration (a sharding engine gathers them; here: as is). No
        module (the final export): 'params' exports the fp32 masters."""
        with self._masters_in_place() if module is None else contextlib.nullcontext():
            yield

    def _masters_in_place(self) -> contextlib.AbstractContextManager:
        """The module's parameters are the fp32 masters for the duration ('params'; else as is)."""
        return self.masters.masters_in_place() if self.masters is not None else contextlib.nullcontext()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return list(values)

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def barrier(self) -> None:
        pass

    # -------------------------------------------------------------- state
    def save(self, folder: Path) -> None:
        """Model weights (safetensors) and optimizer state; only the main rank writes."""
        if not self.env.is_main:
            return
        from safetensors.torch import save_model

        with self._masters_in_place():
            save_model(self._hf_model(), str(folder / MODEL_FILE))
        torch.save(self._optimizer.state_dict(), folder / OPTIMIZER_FILE)

    def load(self, folder: Path) -> None:
        """The fp32 weights into the masters ('params': the compute parameters re-derived from
        them, bit for bit what the uninterrupted run holds) and the optimizer state."""
        from safetensors.torch import load_model

        from tokentrain.engines.fsdp2_checkpoint import is_fsdp_checkpoint

        if is_fsdp_checkpoint(folder) and not owns_checkpoint(folder):
            self._load_fsdp2(folder)
            return
        with self._masters_in_place():
            load_model(self._hf_model(), str(folder / MODEL_FILE), strict=True, device=str(self.env.device))
        state = torch.load(folder / OPTIMIZER_FILE, map_location=self.env.device, weights_only=True)
        self._optimizer.load_state_dict(state)

    def _optimizer_names(self) -> list[str]:
        """The HF model's parameter names in the optimizer's order (its state's indices)."""
        name_of = {id(p): n for n, p in self._hf_model().named_parameters()}
        if self.masters is not None:  # 'params': the optimizer steps the fp32 masters
            name_of.update({id(m): name_of[id(p)] for p, m in zip(self.masters.params, self.masters.masters)})
        return [name_of[id(p)] for g in self._optimizer.param_groups for p in g["params"]]

    def _load_fsdp2(self, folder: Path) -> None:
        """An FSDP2 checkpoint (any world size) read whole on every rank, no process group:
        the weights, and the AdamW state mapped by parameter name onto this optimizer."""
        from tokentrain.engines.fsdp2_checkpoint import read_full_optimizer_state, read_full_state_dict
        from tokentrain.errors import CheckpointError

        with self._masters_in_place():
            self._hf_model().load_state_dict(read_full_state_dict(folder), strict=True)
        by_name = read_full_optimizer_state(folder)
        names = self._optimizer_names()
        unknown = sorted(set(by_name) - set(names))
        if unknown:
            raise CheckpointError(
                f"{folder}: optimizer state for {unknown[0]!r}, not a parameter of this model; "
                "resume with the model it was trained with"
            )
        state = self._optimizer.state_dict()  # this optimizer's param groups (indices in `names` order)
        state["state"] = {i: by_name[n] for i, n in enumerate(names) if n in by_name}
        self._optimizer.load_state_dict(state)
        log.info("%s: an FSDP2 checkpoint, read whole (weights and AdamW state by parameter name)", folder)
