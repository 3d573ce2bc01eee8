"""FSDP2 (`torch.distributed.fsdp.fully_shard`) behind the trainer's engine seam.

Sharding: every decoder layer is one FSDP unit, the HF model is the root (embeddings,
final norm, lm_head). Parameters are DTensors sharded on dim 0 over all ranks; a forward
all-gathers one unit at a time. `MixedPrecisionPolicy` (`mixed_precision`, engines/mixed_precision.py):
gathered parameters in the compute dtype ('params', the default) or fp32 under autocast
('autocast'); gradients reduced in fp32 either way; the fp32 shards are the master weights. `CPUOffloadPolicy`
(`fsdp_cpu_offload = True`) keeps the shards and optimizer state in host memory.

The trainer's loss module (`CausalLMWithLoss`) calls the decoder and `lm_head.weight`
directly, not the HF model's forward, so its forward is registered as an FSDP forward
method of the root (`register_fsdp_forward_method`): the root's parameters are gathered
for exactly that call, and backward reduce-scatters them as usual.

Building: the one model builder (`model/lm.py:load_model`, every engine's: the same config
reading, attention fallback and errors) calls `shard` as its hook. Without weights (config
only) it builds the model on the meta device and `shard` materialises it one FSDP unit at a
time -- a unit is allocated whole, initialised by name (`model/init.py`: the same weights as
every other engine builds from the seed), then sharded -- so the whole model never exists on
one rank. With weights, the model is loaded (whole, on the
host) and then sharded. The optimizer the trainer builds afterwards already holds the
shards; one built earlier is rebuilt over them (same class, same param-group hyperparameters).

Loss scaling and accumulation as for DDP: FSDP averages gradients over ranks, so
`loss_scale` is the world size; gradient sync is off on all but the last micro-batch.
The gradient norm is the global one (DTensor norms are reduced over the mesh); a
non-finite norm applies no update on any rank (`applied` says whether it did).

Checkpoints and their safe reading are in `fsdp2_checkpoint` (DCP, any world size; plain
checkpoints of the local/DDP engines are read too).
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tokentrain.engines import fsdp2_checkpoint as ckpt
from tokentrain.engines.base import Collectives, StepResult
from tokentrain.engines.mixed_precision import describe, resolve_mode
from tokentrain.engines.optimizer import rebuild_optimizer

log = logging.getLogger(__name__)

LOSS_METHOD = "tokentrain_loss"  # the loss module's forward, registered on the FSDP root


def decoder_layers(model: Any) -> list[nn.Module]:
    """The repeated blocks to shard one by one: the classes HF names in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        layers = list(getattr(decoder, "layers", []))
    return layers


class FSDP2Engine(Collectives):
    name = "fsdp2"
    stage: int | None = None  # DeepSpeed's ZeRO stage; none here

    @classmethod
    def create(cls, cfg, env, deepspeed: dict | None, compute_dtype: torch.dtype | None):
        mode = resolve_mode(cfg.mixed_precision, cls.name, compute_dtype)
        return cls(env, compute_dtype, cfg.fsdp_cpu_offload, mode)

    def __init__(
        self,
        env,
        compute_dtype: torch.dtype | None = None,
        cpu_offload: bool = False,
        mixed_precision: str = "params",
    ):
        self.env = env
        self.compute_dtype = compute_dtype
        self.cpu_offload = cpu_offload
        self.mixed_precision = mixed_precision if compute_dtype is not None else "fp32"
        from tokentrain.distributed.env import ensure_process_group

        self.owns_group = ensure_process_group(env)
        self.world_size = dist.get_world_size()
        # FSDP swaps classes and parameters at run time: typed loosely on purpose.
        self.hf_model: Any = None  # the HF model, FSDP root after shard()
        self.module: Any = None  # the trainer's loss module around it
        self.optimizer: Any = None  # over the sharded parameters
        self.applied = True  # whether the last step() updated the weights
        self._mesh: Any = None
        offload = ", parameters and optimizer state offloaded to the CPU" if cpu_offload else ""
        precision = describe(self.mixed_precision, compute_dtype)
        self.description = f"FSDP2 over {self.world_size} rank(s), {precision}{offload}"

    # -------------------------------------------------------------- setup
    @property
    def partitioned_params(self) -> bool:
        """Every forward all-gathers: with several ranks, all of them run it (generation too)."""
        return self.world_size > 1

    @property
    def mesh(self):
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._mesh = init_device_mesh(self.env.device.type, (self.world_size,))
        return self._mesh

    @property
    def _param_dtype(self) -> torch.dtype | None:
        """The dtype of the gathered (compute) parameters; the shards, the masters, stay fp32."""
        return self.compute_dtype if self.mixed_precision == "params" else None

    def _policies(self) -> dict:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

        kw = {
            "mesh": self.mesh,
            # params: gathered in the compute dtype; autocast: gathered fp32 (twice the traffic)
            "mp_policy": MixedPrecisionPolicy(param_dtype=self._param_dtype, reduce_dtype=torch.float32),
        }
        if self.cpu_offload:
            kw["offload_policy"] = CPUOffloadPolicy(pin_memory=self.env.device.type == "cuda")
        return kw

    @property
    def shard_hook(self):
        """The model builder (`model/lm.py:load_model`) hands it the model it built: loaded on the
        host, or on the meta device for a config-only folder, with its initialiser (see the
        module docstring)."""
        return self.shard

    def shard(self, model: nn.Module, init=None) -> None:
        """fully_shard each decoder layer, then the root; `init` given (`model/lm.py:Initialise`):
        the model is on the meta device, each unit is allocated whole, initialised by name, then
        sharded."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(model, FSDPModule):
            self.hf_model = model
            return
        kw, dev = self._policies(), self.env.device
        layers = decoder_layers(model)
        for layer in layers:
            if init is not None:
                _materialize(list(layer.modules()), dev, init)
            fully_shard(layer, **kw)
        if init is not None:
            inside = {id(m) for layer in layers for m in layer.modules()}
            _materialize([m for m in model.modules() if id(m) not in inside], dev, init)
        fully_shard(model, **kw)
        self.hf_model = model

    def prepare(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """Shard `module.model` (if the builder's hook did not), route the loss module's forward
        through the root's FSDP hooks, and make sure the optimizer holds the shards."""
        from torch.distributed.fsdp import register_fsdp_forward_method

        before = {id(p): n for n, p in module.named_parameters()}
        self.shard(module.get_submodule("model"))
        setattr(self.hf_model, LOSS_METHOD, module.forward)
        register_fsdp_forward_method(self.hf_model, LOSS_METHOD)
        module.forward = getattr(self.hf_model, LOSS_METHOD)  # module(...) now gathers the root first
        self.module = module
        now = dict(module.named_parameters())
        self.optimizer = rebuild_optimizer(optimizer, {i: now[n] for i, n in before.items() if n in now})
        return module

    @property
    def unwrapped(self) -> nn.Module:
        return self.module

    # -------------------------------------------------------------- one step
    @property
    def loss_scale(self) -> float:
        return float(self.world_size)

    @contextlib.contextmanager
    def accumulate(self, is_last: bool):
        """Reduce-scatter gradients only on the step's last micro-batch."""
        self.hf_model.set_requires_gradient_sync(is_last)
        try:
            yield
        finally:
            self.hf_model.set_requires_gradient_sync(True)

    def forward(self, *args):
        return self.module(*args)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_norm: float) -> StepResult:
        """Clip (if max_norm > 0) by the global norm, apply unless it is non-finite, clear."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if not params:
            norm = 0.0
        elif max_norm > 0:
            norm = _full(torch.nn.utils.clip_grad_norm_(params, max_norm))
        else:
            norm = _full(torch.nn.utils.get_total_norm([p.grad for p in params]))
        self.applied = math.isfinite(norm)
        if self.applied:  # a NaN/inf gradient would poison the weights and the Adam moments
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(norm, self.applied)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def gradients(self) -> list[torch.Tensor]:
        """This rank's fp32 gradient shards (DTensors)."""
        return [p.grad for p in self.module.parameters() if p.grad is not None]

    @contextlib.contextmanager
    def full_parameters(self, module: nn.Module | None = None):
        """`module` given (the probes on the freshly built model): the root's parameters
        (embeddings, norm, lm_head) are gathered for the duration, so code may call them
        directly; the layers gather themselves in their forwards. No module (the final
        export): every rank takes part in gathering the full state dict, and on the main
        rank `hf_model.state_dict()` returns it (CPU, full tensors) for the duration."""
        root = self.hf_model
        if root is None:  # not sharded yet: whole already
            yield
            return
        if module is not None:
            root.unshard()
            try:
                yield
            finally:
                root.reshard()
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        root.state_dict = lambda *a, **k: full  # instance attribute: shadows nn.Module.state_dict
        try:
            yield
        finally:
            del root.state_dict

    # -------------------------------------------------------------- state
    def save(self, folder: Path) -> None:
        """Model and optimizer shards of every rank into `folder/fsdp/` (DCP; all ranks write)."""
        ckpt.save(self.hf_model, self.optimizer, Path(folder))

    def load(self, folder: Path) -> None:
        """Restore from a checkpoint written on any number of ranks: DCP reshards its own; a
        plain (local/DDP) one is read by the main rank and broadcast into the shards."""
        from tokentrain.engines.plain_checkpoint import owns_checkpoint as is_plain

        if is_plain(folder) and not ckpt.is_fsdp_checkpoint(folder):
            ckpt.load_plain(self.hf_model, self.optimizer, Path(folder), self.env.is_main, not self.cpu_offload)
            log.info(
                "%s: a local/DDP checkpoint, sharded over %d rank(s) (AdamW state by parameter name)",
                folder,
                self.world_size,
            )
        else:
            ckpt.load(self.hf_model, self.optimizer, Path(folder))


def _full(norm) -> float:
    """A norm over DTensor gradients is itself a DTensor: its full value is the global norm."""
    from torch.distributed.tensor import DTensor

    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


def _materialize(modules: list[nn.Module], device, init) -> None:
    """Allocate the (meta) parameters and buffers owned directly by `modules` on `device`
    (shared, tied, parameters stay shared) and have `init` initialise them."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in modules:
        for name, p in m._parameters.items():
            if p is not None and p.is_meta:
                owners.setdefault(id(p), []).append((m, name))
    for m in modules:
        m.to_empty(device=device, recurse=False)
    for places in owners.values():
        first = getattr(*places[0])
        for m, name in places[1:]:
            setattr(m, name, first)
    init(modules)
