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


def _kept_by_selective(model, module, batch: int, length: int) -> int:
    """Bytes of the outputs that 'selective' checkpointing keeps inside the decoder layers, read
    off a plain forward with the same policy the trainer hands torch (its cache is not public)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.checkpoint import CheckpointPolicy

    from tokentrain.training.checkpointing import _keep_matmuls, _saved_ops

    saved, inside, total = frozenset(_saved_ops()), [0], [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if inside[0] and _keep_matmuls(saved, None, func) == CheckpointPolicy.MUST_SAVE:
                outs = out if isinstance(out, tuple | list) else (out,)
                total[0] += sum(o.nbytes for o in outs if isinstance(o, torch.Tensor))
            return out

    def enter(*_):
        inside[0] += 1

    def leave(*_):
        inside[0] -= 1

    for layer in model.model.layers:
        layer.register_forward_pre_hook(enter)
        layer.register_forward_hook(leave)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (batch, length), generator=g)
    with Count():
        module(ids, ids, torch.arange(length).repeat(batch, 1))
    return total[0]


@pytest.mark.parametrize("checkpointing", [False, True, "selective"])
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
    batch, length = 2, 256
    # 'selective' = what True keeps (the layers' inputs) + the outputs its policy keeps
    kept = _kept_by_selective(model, module, batch, length) if checkpointing == "selective" else 0
    if checkpointing:
        enable_checkpointing(model, True)  # (the selective cache itself is not seen by saved-tensor hooks)
    measured = _saved_bytes(model, module, batch, length) + kept
    saved, transient = saved_and_transient(shape, Shape(batch, length, 4, checkpointing, False, 128))
    assert 0.8 * measured <= saved <= 1.25 * measured, saved / measured
    assert transient > 0  # the loss's logit chunks (and the layer recomputed): a peak, not saved
    if checkpointing == "selective":  # between the two others, as the docs say
        full = saved_and_transient(shape, Shape(batch, length, 4, False, False, 128))[0]
        least = saved_and_transient(shape, Shape(batch, length, 4, True, False, 128))[0]
        assert least < saved < full
