"""What each `gradient_checkpointing` setting recomputes in backward, counted on a real model:
True runs the whole layer again (its matmuls too), 'selective' only the cheap ops between the
matmuls, whose outputs it kept. (That the losses and weights do not change:
tests/training/test_trainer.py.)"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.model.families import model, pack
from tokentrain.training.checkpointing import enable_checkpointing

aten = torch.ops.aten
MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default}
CHEAP = {aten.silu.default, aten.rsqrt.default}  # the MLP's activation, RMSNorm


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] += 1
        return func(*args, **(kwargs or {}))


def backward_ops(mode) -> Counter:
    """The forward ops (matmuls, cheap ones) that run during backward of a llama pack's loss."""
    m = model("llama", "sdpa").train()
    if mode:
        enable_checkpointing(m, mode)
    _, ids, pos, _ = pack(m.config.vocab_size)
    loss = m(input_ids=ids, position_ids=pos, use_cache=False).logits.float().square().mean()
    with OpCount() as count:
        loss.backward()
    return Counter({op: n for op, n in count.ops.items() if op in MATMULS | CHEAP})


@pytest.fixture(scope="module")
def plain():
    return backward_ops(False)


def test_full_checkpointing_runs_each_layers_matmuls_again(plain):
    full = backward_ops(True)
    assert sum(full[op] for op in MATMULS) > sum(plain[op] for op in MATMULS)
    assert all(full[op] > plain[op] for op in CHEAP)


def test_selective_checkpointing_keeps_the_matmuls_and_recomputes_the_cheap_ops(plain):
    selective = backward_ops("selective")
    assert sum(selective[op] for op in MATMULS) == sum(plain[op] for op in MATMULS)
    assert all(selective[op] > plain[op] for op in CHEAP)
