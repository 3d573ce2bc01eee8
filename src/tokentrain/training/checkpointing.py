"""Activation (gradient) checkpointing of the decoder layers, and what each setting trades.

* ``True``: a layer keeps only its input; backward runs its forward again. Least memory
  (activations of one layer at a time), about a third more compute.
* ``'selective'``: a layer keeps the outputs of its matmuls and attention -- the expensive ops --
  and recomputes the cheap ones between them (norms, activations, rotary, residual adds), as
  torchtitan's op-level selective checkpointing does. Most of the memory saved by ``True`` on
  long rows (the elementwise tensors are many), for a few percent of compute.
* ``False``: everything kept; fastest, most memory.

Non-reentrant checkpointing in every case (it composes with compiled layers and with FSDP2).
"""

from __future__ import annotations

import functools

import torch


def _saved_ops() -> set:
    """The ops whose outputs 'selective' keeps: matmuls and attention kernels (those this torch has)."""
    aten = torch.ops.aten
    names = (
        "mm",
        "addmm",
        "bmm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    )
    return {getattr(aten, n).default for n in names if hasattr(aten, n)}


def _keep_matmuls(saved: frozenset, ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    # (a varlen kernel registered as its own op: kept too)
    keep = op in saved or "varlen" in str(op)
    return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_kwargs(mode: bool | str) -> dict:
    """What transformers hands `torch.utils.checkpoint.checkpoint` for `mode` (True or 'selective')."""
    kwargs: dict = {"use_reentrant": False}
    if mode == "selective":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        policy = functools.partial(_keep_matmuls, frozenset(_saved_ops()))
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, policy)
    return kwargs


def enable_checkpointing(model, mode: bool | str = True) -> None:
    """Checkpoint each decoder layer of an HF model (`mode` True or 'selective'); the method's
    name changed in transformers 5.x."""
    kwargs = checkpoint_kwargs(mode)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
