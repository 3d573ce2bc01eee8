"""Mixed precision, the one place that decides it: `mixed_precision = 'auto' | 'autocast' | 'params'`.

    autocast  parameters stay fp32; autocast casts each weight to the compute dtype in every op
              of every micro-batch (and back for its gradient).
    params    the model's parameters *are* in the compute dtype (bf16) for forward and backward;
              the optimizer owns an fp32 master copy (its state is fp32 too), gradients are
              accumulated and reduced in fp32, and after each update the masters are copied
              into the compute parameters once. What FSDP2 does natively (`MixedPrecisionPolicy`:
              fp32 shards, bf16 gathered), and DeepSpeed's bf16 mode (bf16 module, fp32
              partitions in its optimizer). For local and ddp: `MasterWeights` below.

Either way the forward runs under autocast (model/lm.py): ops that autocast keeps in fp32 stay
there, and the loss is fp32. Checkpoints always hold the fp32 masters, so a resume restores them
and re-derives the compute parameters: the continuation is bit-identical, and a checkpoint of
one mode resumes in the other.

`auto` keeps what each engine did before the setting existed: `params` for fsdp2 and deepspeed
(their native form), `autocast` for local and ddp (DDP's reducer overlaps the gradient
all-reduce with backward; `params` on ddp reduces the fp32 gradients after backward instead).
fp16 needs loss scaling, which only DeepSpeed has: `params` with fp16 is refused elsewhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from tokentrain.errors import ConfigError

NATIVE_PARAMS = ("fsdp2", "deepspeed")  # engines whose own machinery holds compute-dtype parameters


def resolve_mode(requested: str, engine: str, compute_dtype: torch.dtype | None) -> str:
    """'fp32' (nothing to mix), 'autocast' or 'params' for this engine and compute dtype."""
    if compute_dtype is None:
        return "fp32"
    if requested == "auto":
        return "params" if engine in NATIVE_PARAMS else "autocast"
    if requested == "params" and compute_dtype == torch.float16 and engine != "deepspeed":
        raise ConfigError(
            f"mixed_precision = 'params' with dtype = 'float16' needs loss scaling, which the {engine} engine does "
            "not have; use dtype = 'bfloat16', mixed_precision = 'autocast', or --deepspeed"
        )
    return requested


def describe(mode: str, compute_dtype: torch.dtype | None) -> str:
    """The log's words for a mode ("compute parameters bfloat16, fp32 master weights ...")."""
    name = str(compute_dtype or torch.float32).removeprefix("torch.")
    if mode == "params":
        return f"{name} compute parameters, fp32 master weights and gradient reduction"
    if mode == "autocast":
        return f"fp32 parameters, {name} autocast"
    return "fp32"


class MasterWeights:
    """bf16 compute parameters in the module, fp32 masters for the optimizer (local, ddp).

    Each compute parameter's gradient is added into its master's fp32 gradient as soon as
    autograd has accumulated it (a post-accumulate-grad hook), and the bf16 one is dropped: the
    micro-batches of a step accumulate in fp32 and no bf16 gradient outlives its backward. The
    fp32 gradients are views into one flat buffer, so a data-parallel engine reduces them in one
    fp32 all-reduce (`flat_grad`). Buffers (rotary tables) are left as they are."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        self.params = [p for p in module.parameters() if p.requires_grad]  # tied weights: one parameter
        self.masters = [nn.Parameter(p.detach().clone().float()) for p in self.params]
        total = sum(p.numel() for p in self.params)
        device = self.params[0].device if self.params else torch.device("cpu")
        self.flat_grad = torch.zeros(total, dtype=torch.float32, device=device)
        self.grads, start = [], 0
        for p in self.params:
            self.grads.append(self.flat_grad[start : start + p.numel()].view_as(p))
            start += p.numel()
        with torch.no_grad():
            for p in self.params:
                p.data = p.data.to(dtype)
        for p, g in zip(self.params, self.grads, strict=True):
            p.register_post_accumulate_grad_hook(_take_grad(g))

    def replacements(self) -> dict[int, torch.Tensor]:
        """id(compute parameter) -> its master: what the optimizer is rebuilt over."""
        return {id(p): m for p, m in zip(self.params, self.masters, strict=True)}

    def attach_grads(self) -> list[torch.Tensor]:
        """The masters, each with its fp32 gradient set (for the norm, clipping and the step)."""
        for m, g in zip(self.masters, self.grads, strict=True):
            m.grad = g
        return [*self.masters]

    def zero_grad(self) -> None:
        self.flat_grad.zero_()
        for m in self.masters:
            m.grad = None

    @torch.no_grad()
    def refresh(self) -> None:
        """The compute parameters re-derived from the masters (after an update or a load)."""
        for p, m in zip(self.params, self.masters, strict=True):
            p.copy_(m)

    @contextlib.contextmanager
    def masters_in_place(self) -> Iterator[None]:
        """For the duration the module's parameters *are* the fp32 masters (same storage): its
        state dict saves, loads into and exports them. On exit the compute parameters are
        re-derived from the masters (a load changed them)."""
        compute = [p.data for p in self.params]
        for p, m in zip(self.params, self.masters, strict=True):
            p.data = m.data
        try:
            yield
        finally:
            for p, c in zip(self.params, compute, strict=True):
                p.data = c
            self.refresh()


def _take_grad(into: torch.Tensor):
    def hook(p: torch.Tensor) -> None:
        assert p.grad is not None
        into.add_(p.grad)
        p.grad = None

    return hook
