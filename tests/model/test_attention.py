"""Documents in a pack never attend to each other, on every backend and batch size."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tokentrain.model.attention import (
    DocMasking,
    probe_isolation,
    select_masking,
    varlen_kwargs,
)
from tokentrain.model.lm import CausalLMWithLoss
from tokentrain.model.masks import block_causal_mask, segment_ids

CASES = [
    ("sdpa", "positions"),
    ("sdpa", "mask4d"),
    ("eager", "positions"),
    ("eager", "mask4d"),
    ("sdpa", "varlen"),
]  # varlen on sdpa: the flash path's flattening of B rows into one, checked on CPU

LENGTHS = [[7, 12, 5, 8], [20, 3, 9]]  # two packed rows of 32 tokens (rows are independent packs)


def _pack(vocab):
    g = torch.Generator().manual_seed(3)
    docs = [[torch.randint(3, vocab, (n,), generator=g) for n in row] for row in LENGTHS]
    ids = torch.stack([torch.cat(row) for row in docs])
    pos = torch.stack([torch.cat([torch.arange(len(d)) for d in row]) for row in docs])
    return docs, ids, pos


@pytest.fixture(scope="module")
def models(tiny_model):
    return {
        impl: AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=impl).eval()
        for impl in ("sdpa", "eager")
    }


@pytest.mark.parametrize("impl, mode", CASES)
def test_each_document_of_a_pack_equals_the_document_alone(models, impl, mode):
    model = models[impl]
    masking = DocMasking(mode, impl)
    docs, ids, pos = _pack(model.config.vocab_size)
    with torch.no_grad():
        packed = masking.unflatten(model(**masking.model_inputs(ids, pos)).logits, ids.shape[0])
        for r, row in enumerate(docs):
            start = 0
            for d in row:
                alone = model(input_ids=d[None], use_cache=False).logits[0]
                got = packed[r, start : start + len(d)]
                assert (got - alone).abs().max().item() <= 1e-5
                start += len(d)


@pytest.mark.parametrize("impl, mode", CASES)
def test_loss_of_each_document_equals_alone_and_no_gradient_crosses(models, impl, mode):
    model = models[impl]
    lm = CausalLMWithLoss(model, DocMasking(mode, impl), None)
    docs, ids, pos = _pack(model.config.vocab_size)
    emb_layer = model.get_input_embeddings()
    for r, row in enumerate(docs):
        start = 0
        for _k, d in enumerate(row):
            labels = torch.full_like(ids, -100)
            labels[r, start : start + len(d) - 1] = d[1:]
            packed_loss = lm(ids, labels, pos)
            alone_labels = torch.full((1, len(d)), -100)
            alone_labels[0, :-1] = d[1:]
            alone = lm(d[None], alone_labels, torch.arange(len(d))[None])
            assert abs(packed_loss.item() - alone.item()) <= 1e-5 * max(1.0, abs(alone.item()))
            # d(loss of document k) / d(embeddings of every other token) is exactly zero
            embeds = emb_layer(ids).detach().requires_grad_(True)
            kw = lm.masking.model_inputs(ids, pos)
            kw.pop("input_ids")
            flat = embeds.reshape(1, -1, embeds.shape[-1]) if mode == "varlen" else embeds
            logits = lm.masking.unflatten(model(inputs_embeds=flat, **kw).logits, ids.shape[0])
            doc_loss = torch.nn.functional.cross_entropy(
                logits[labels != -100], labels[labels != -100], reduction="sum"
            )
            (g,) = torch.autograd.grad(doc_loss, embeds)
            others = torch.ones(ids.shape, dtype=torch.bool)
            others[r, start : start + len(d)] = False
            assert g[others].abs().max().item() == 0.0
            assert g[~others].abs().max().item() > 0
            start += len(d)


def test_the_probe_catches_a_leak(models):
    """With use_cache unset transformers does not detect the packing: documents leak."""

    class Leaky(DocMasking):
        def model_inputs(self, input_ids, position_ids, additive_dtype=None, cu_seqlens=None):
            return {"input_ids": input_ids, "position_ids": position_ids}

    assert probe_isolation(models["sdpa"], Leaky("positions", "sdpa"), torch.device("cpu")) > 1e-3

    class BoolMaskOnEager(DocMasking):  # eager adds the mask: a bool mask is silently wrong
        def model_inputs(self, input_ids, position_ids, additive_dtype=None, cu_seqlens=None):
            return {
                "input_ids": input_ids,
                "position_ids": position_ids,
                "use_cache": False,
                "attention_mask": block_causal_mask(position_ids),
            }

    assert probe_isolation(models["eager"], BoolMaskOnEager("mask4d", "eager"), torch.device("cpu")) > 1e-3
    for impl in ("sdpa", "eager"):
        chosen = select_masking(models[impl], impl, "auto", torch.device("cpu"), torch.bfloat16)
        assert chosen.mode in ("positions", "mask4d")


def test_mask_helpers():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert segment_ids(pos).tolist() == [[1, 1, 1, 2, 2, 3], [1, 1, 1, 1, 1, 1]]
    m = block_causal_mask(pos)
    assert m.shape == (2, 1, 6, 6) and m.dtype == torch.bool
    assert not m[0, 0, 3, 2] and m[0, 0, 4, 3] and not m[0, 0, 3, 4] and m[1, 0, 5, 0]
    add = block_causal_mask(pos, torch.float32)
    assert add[0, 0, 3, 2] == torch.finfo(torch.float32).min and add[0, 0, 4, 3] == 0
    assert block_causal_mask(torch.arange(5)[None]) is None  # one document per row: plain causal
    w = block_causal_mask(pos, window=2)  # a query sees itself and the one before it, in its document
    assert w[1, 0, 5].tolist() == [False, False, False, False, True, True] and w[0, 0, 2].tolist()[:3] == [0, 1, 1]
    kw = varlen_kwargs(pos)
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 12] and kw["max_length_q"] == 6
    assert kw["position_ids"].shape == (1, 12)
