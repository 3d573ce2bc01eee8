"""Summed chunked CE (values, gradients, no-target case), the lr schedule, FLOPs per document."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tokentrain.metrics.flops import FlopCounter, sum_sq_doc_lengths
from tokentrain.model.loss import linear_cross_entropy_sum, logits_cross_entropy_sum
from tokentrain.training.schedule import lr_factor


@pytest.mark.parametrize("chunk", [1, 7, 0])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_loss_matches_full_cross_entropy(chunk, bias):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 33, 16, generator=g, requires_grad=True)
    w = torch.randn(300, 16, generator=g, requires_grad=True)
    b = torch.randn(300, generator=g, requires_grad=True) if bias else None
    y = torch.randint(0, 300, (2, 33), generator=g)
    y[0, :9] = -100
    loss = linear_cross_entropy_sum(h, y, w, b, chunk_tokens=chunk)
    got = torch.autograd.grad(loss * 0.5, [h, w] + ([b] if bias else []))
    ref_loss = F.cross_entropy(F.linear(h, w, b).reshape(-1, 300), y.reshape(-1), reduction="sum")
    ref = torch.autograd.grad(ref_loss * 0.5, [h, w] + ([b] if bias else []))
    assert loss.dtype == torch.float32 and abs(loss.item() - ref_loss.item()) < 1e-3
    for a, r in zip(got, ref):
        assert (a - r).abs().max().item() < 1e-4
    assert (got[0][0, :9] == 0).all()  # non-target positions get no gradient
    with torch.no_grad():
        assert abs(linear_cross_entropy_sum(h, y, w, b, chunk_tokens=chunk).item() - ref_loss.item()) < 1e-3
    assert abs(logits_cross_entropy_sum(F.linear(h, w, b), y, chunk_tokens=chunk).item() - ref_loss.item()) < 1e-3


def test_no_target_tokens_give_zero_loss_and_zero_gradients_not_nan():
    h = torch.randn(1, 5, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    y = torch.full((1, 5), -100)
    loss = linear_cross_entropy_sum(h, y, w)
    loss.backward()
    assert loss.item() == 0.0 and (h.grad == 0).all() and (w.grad == 0).all()
    x = torch.randn(1, 5, 50, requires_grad=True)
    l2 = logits_cross_entropy_sum(x, y)
    l2.backward()
    assert l2.item() == 0.0 and (x.grad == 0).all()


def test_bf16_compute_keeps_fp32_sum():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(64, 32, generator=g)
    w = torch.randn(200, 32, generator=g) * 0.1
    y = torch.randint(0, 200, (64,), generator=g)
    ref = F.cross_entropy(h @ w.t(), y, reduction="sum").item()
    got = linear_cross_entropy_sum(h, y, w, compute_dtype=torch.bfloat16).item()
    assert abs(got - ref) / ref < 1e-2


def test_schedule_warmup_from_lr_over_40_then_cosine_to_floor():
    total, warm, floor = 1000, 0.025, 0.15
    assert lr_factor(0, total, warm, floor) == pytest.approx(1 / 40)
    assert lr_factor(25, total, warm, floor) == pytest.approx(1.0)
    assert lr_factor(12, total, warm, floor) == pytest.approx(1 / 40 + (1 - 1 / 40) * 12 / 25)
    mid = 25 + (1000 - 25) / 2
    assert lr_factor(int(mid), total, warm, floor) == pytest.approx(
        floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (int(mid) - 25) / 975))
    )
    assert lr_factor(1000, total, warm, floor) == pytest.approx(floor)
    factors = [lr_factor(s, total, warm, floor) for s in range(25, 1001)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))
    assert lr_factor(0, 10, 0.0, 0.0) == 1.0


def test_attention_flops_use_document_lengths_not_max_length(tiny_model):
    from transformers import AutoModelForCausalLM

    assert sum_sq_doc_lengths([0, 3, 10]) == 9 + 49
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    fc = FlopCounter.for_model(model)
    cfg = model.config
    emb = cfg.vocab_size * cfg.hidden_size
    assert fc.matmul_params == sum(p.numel() for p in model.parameters()) - emb
    assert fc.layers == cfg.num_hidden_layers and fc.attn_dim == cfg.hidden_size
    one_doc = fc.step_flops(128, 128**2)
    four_docs = fc.step_flops(128, 4 * 32**2)
    assert one_doc - four_docs == pytest.approx(6 * fc.layers * fc.attn_dim * (128**2 - 4 * 32**2))
