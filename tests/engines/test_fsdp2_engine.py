"""The FSDP2 engine in-process on a 1-rank gloo group it makes itself: an optimizer built over
the unsharded model is rebuilt over the shards with the same hyperparameters, and a step
equals the plain one-process step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist


@pytest.fixture
def engine():
    from tokentrain.distributed.env import DistEnv
    from tokentrain.engines.fsdp2 import FSDP2Engine

    assert not dist.is_initialized()
    eng = FSDP2Engine(DistEnv(0, 1, 0, 1, torch.device("cpu"), "gloo"))
    assert eng.owns_group and dist.get_world_size() == 1
    yield eng
    dist.destroy_process_group()


def loss_module(seed: int = 0):
    from transformers import AutoModelForCausalLM

    from tokentrain.model.attention import DocMasking
    from tokentrain.model.lm import CausalLMWithLoss
    from tokentrain.model.tiny import llama_config

    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(llama_config(vocab_size=300, hidden_size=32, layers=2, heads=4))
    hf.config.use_cache = False
    return CausalLMWithLoss(hf, DocMasking("positions", "sdpa"), None)


def adamw(module):
    return torch.optim.AdamW(module.parameters(), lr=1e-2, betas=(0.8, 0.9), weight_decay=0.1, foreach=True)


def test_prepare_rebuilds_the_optimizer_over_the_shards_and_a_step_equals_the_plain_one(engine):
    from torch.distributed.tensor import DTensor

    plain = loss_module()
    module = copy.deepcopy(plain)
    opt, ref_opt = adamw(module), adamw(plain)
    prepared = engine.prepare(module, opt)
    new = engine.optimizer
    assert new is not opt and type(new) is type(opt)
    assert [p for g in new.param_groups for p in g["params"]] == list(prepared.parameters())
    assert all(isinstance(p, DTensor) for p in prepared.parameters())
    keep = ("lr", "betas", "weight_decay", "foreach", "eps")
    assert [{k: g[k] for k in keep} for g in new.param_groups] == [{k: g[k] for k in keep} for g in opt.param_groups]

    ids = torch.randint(3, 300, (1, 16))
    labels, pos = ids.roll(-1, 1), torch.arange(16)[None]
    for _ in range(2):
        with engine.accumulate(is_last=True):
            engine.backward(engine.forward(ids, labels, pos) * engine.loss_scale / 16)
        result = engine.step(max_norm=0.5)
        assert result.applied
        norm = result.grad_norm
        assert engine.applied
        (plain(ids, labels, pos) / 16).backward()
        ref_norm = float(torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.5))
        ref_opt.step()
        ref_opt.zero_grad()
        assert norm == pytest.approx(ref_norm, rel=1e-5)
    ref = plain.state_dict()
    for name, p in prepared.named_parameters():
        torch.testing.assert_close(p.full_tensor(), ref[name], rtol=1e-5, atol=1e-7)
