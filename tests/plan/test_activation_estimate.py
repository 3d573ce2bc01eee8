"""plan/memory.py's activation estimate against the tensors a real forward saves for backward."""

from __future__ import annotations

import pytest
import torch

from tokentrain.plan.memory import Shape, saved_and_transient
from tokentrain.plan.shape import model_shape


def _saved_bytes(model, module, batch: int, length: int) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps from one forward of the run's module."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (batch, length), generator=g)
    pos = torch.arange(length).repeat(batch, 1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(ids, ids, pos)
    return sum(seen.values())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_is_near_what_a_forward_saves(tiny_model, checkpointing):
    from tokentrain.model.attention import select_masking
    from tokentrain.model.lm import CausalLMWithLoss, load_model
    from tokentrain.training.checkpointing import enable_checkpointing

    shape, why = model_shape(str(tiny_model), False)
    assert shape is not None, why
    cpu = torch.device("cpu")
    model = load_model(str(tiny_model), False, "sdpa", cpu)
    module = CausalLMWithLoss(model, select_masking(model, "sdpa", "auto", cpu, None), None)
    assert shape.fused_loss == module.fused and shape.params == sum(p.numel() for p in model.parameters())
    model.train()
    if checkpointing:
        enable_checkpointing(model)
    batch, length = 2, 256
    measured = _saved_bytes(model, module, batch, length)
    saved, transient = saved_and_transient(shape, Shape(batch, length, 4, checkpointing, False, 128))
    assert 0.8 * measured <= saved <= 1.25 * measured
    assert transient > 0  # the loss's logit chunks (and the layer recomputed): a peak, not saved
