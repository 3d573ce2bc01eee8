"""torch.compile of each decoder layer, as torchtitan does: one graph per block (the layers
share it), the embedding, the loss and the engines' hooks left eager.

It is the layer's ``forward`` that is compiled, not its ``__call__``: the hooks an engine puts
on a block (FSDP2's gather and reshard, ZeRO-3's parameter fetch, DDP's) and the activation
checkpointing wrapper around it run eagerly outside the graph, so compiling composes with every
engine and with `gradient_checkpointing`, and the parameter names (checkpoints, exports) do not
change.

Eager stays the reference: the start-up probes choose the attention path on the eager model,
then run again on the compiled one (`Trainer._setup_model`). A compiled model that fails them,
or raises, is put back to eager in one log line when ``compile = 'auto'``; ``compile = True``
then fails in one line (exit 2: the setting cannot run here; set it to 'auto' or False).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def wanted(setting: bool | str, device: torch.device) -> bool:
    """Whether to compile: True/False as set; 'auto': on CUDA (on CPU the compile time, a minute
    for a small model, rarely pays back)."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def compile_layers(model: nn.Module) -> list[nn.Module]:
    """Compile the forward of each decoder layer of `model` (the blocks FSDP2 shards); the layers."""
    from tokentrain.engines.fsdp2 import decoder_layers

    layers = decoder_layers(model)
    for layer in layers:
        layer.forward = torch.compile(layer.forward)
    return layers


def uncompile_layers(layers: list[nn.Module]) -> None:
    """Back to the class's own (eager) forward."""
    for layer in layers:
        if "forward" in vars(layer):
            del layer.forward
