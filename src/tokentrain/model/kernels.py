"""Fused GPU kernels from Liger-Kernel (``pip install 'tokentrain[gpu]'``), or plain PyTorch.

Liger's Triton kernels fuse what PyTorch runs as several memory-bound ops: RMSNorm, the SwiGLU
gate, RoPE, and the output projection with the cross-entropy (no tokens x vocab logits in
memory). They are applied the way transformers' own integration does (Liger's
``_apply_liger_kernel_to_instance``, per model family) to the model already built, so every
engine's builder (`model/lm.py:load_model`) gets them alike; the loss keeps our rule -- the fp32
*sum* over target tokens, label -100 costs nothing -- by calling Liger's fused linear
cross-entropy with ``reduction='sum'`` and ``ignore_index=-100`` (`linear_cross_entropy_sum`).

The pure-PyTorch path (`model/loss.py`, the model's own modules) stays the reference and the
fallback: ``kernels = 'auto'`` takes Liger only on CUDA with the package importable and the
model's family supported, else PyTorch -- one log line says which and why. ``'liger'``
demands it (one-line error when it cannot run), ``'torch'`` never uses it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tokentrain.config.schema import KERNELS
from tokentrain.errors import ConfigError, first_line
from tokentrain.model.loss import IGNORE_INDEX, target_positions

if TYPE_CHECKING:
    from transformers import PreTrainedModel

INSTALL = "pip install 'tokentrain[gpu]'"
# What is fused in the model: each family's apply function takes the names it knows (gemma: geglu).
PATCHES = dict(rope=True, rms_norm=True, swiglu=True, geglu=True, layer_norm=True)


@dataclass(frozen=True)
class Kernels:
    """The kernels in use ('liger' or 'torch') and why: the start-up log line."""

    name: str
    why: str

    @property
    def liger(self) -> bool:
        return self.name == "liger"


def liger_families() -> frozenset[str] | str:
    """The model types the installed Liger patches, or why it cannot be imported (a string)."""
    try:
        patch = importlib.import_module("liger_kernel.transformers.monkey_patch")
    except Exception as e:  # not installed, no triton, a transformers it does not know
        return f"{type(e).__name__}: {first_line(e)}"
    return frozenset(patch.MODEL_TYPE_TO_APPLY_LIGER_FN)


def choose_kernels(requested: str, device: torch.device, model_type: str) -> Kernels:
    """'auto': Liger when it can run here, else PyTorch, with the reason; 'liger' that cannot
    run is a ConfigError naming what is missing."""
    if requested not in KERNELS:
        raise ConfigError(f"kernels = {requested!r}: must be one of {', '.join(KERNELS)}")
    if requested == "torch":
        return Kernels("torch", "kernels = 'torch'")
    why = ""
    if device.type != "cuda":
        why = f"Liger's kernels are Triton, CUDA only (device here: {device.type})"
    else:
        families = liger_families()
        if isinstance(families, str):
            why = f"liger-kernel is not importable ({families}); {INSTALL}"
        elif model_type not in families:
            why = f"liger-kernel has no kernels for model type {model_type!r}"
    if why and requested == "liger":
        raise ConfigError(f"kernels = 'liger': {why}; use kernels = 'auto' or 'torch'")
    if why:
        return Kernels("torch", f"PyTorch's: {why}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = f"liger-kernel {version('liger-kernel')}"
    except PackageNotFoundError:  # importable from a path without its metadata
        release = "liger-kernel"
    return Kernels("liger", f"{release}: RMSNorm, SwiGLU, RoPE, fused linear cross-entropy")


def apply_kernels(model: PreTrainedModel, kernels: Kernels) -> None:
    """Patch the built model's modules with Liger's (in place; parameters and their names are
    unchanged, so checkpoints and exports are the same). The loss head is not patched: the
    trainer calls the decoder and `linear_cross_entropy_sum` itself."""
    if not kernels.liger:
        return
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, cross_entropy=False, fused_linear_cross_entropy=False, **PATCHES)


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    compute_dtype: torch.dtype | None,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Liger's fused linear cross-entropy under our rule: the fp32 sum over targets (label -100
    costs nothing), the projection in the compute dtype, the weight gradient accumulated in fp32
    (Liger hands it back in the compute dtype). With no target: a zero still on the graph, as
    `model/loss.py`'s, so every parameter gets a gradient."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    keep = target_positions(y, targets)  # `targets` found on the host: no wait for the GPU here
    h, y = h.index_select(0, keep), y.index_select(0, keep)
    dt = compute_dtype or weight.dtype
    if len(y) == 0:
        return (h.sum() * weight.sum()).float() * 0.0
    with torch.autocast(hidden.device.type, enabled=False):
        loss = liger_fused_linear_cross_entropy(
            h.to(dt),
            weight.to(dt),
            y,
            bias.to(dt) if bias is not None else None,
            ignore_index=IGNORE_INDEX,
            reduction="sum",
            accum_dtype=torch.float32,
        )
    return loss.float()
