"""Sliding windows survive packing: every document of a pack equals the document run alone,
in every doc_masking mode, on models whose window is shorter than the documents; and the
start-up probe catches a mask that drops the window."""

from __future__ import annotations

import pytest
import torch

from tokentrain.model.attention import DocMasking, attention_windows, probe_logits, select_masking

from .families import WINDOW, model, pack, worst_vs_alone

FAMILIES = ["mistral", "qwen2", "phi3", "starcoder2", "gemma2", "gemma3"]
IMPLS = {"gemma2": ["eager"]}  # gemma2 has no sdpa (sdpa cannot soft-cap)


def _cases():
    for fam in FAMILIES:
        for impl in IMPLS.get(fam, ["sdpa", "eager"]):
            for mode in ("positions", "mask4d"):
                yield fam, impl, mode


@pytest.mark.parametrize("family, impl, mode", list(_cases()))
def test_packed_documents_match_alone_with_a_window_shorter_than_them(family, impl, mode):
    m = model(family, impl)
    masking = DocMasking(mode, impl, attention_windows(m.config))
    docs, ids, pos, cu = pack(m.config.vocab_size)
    with torch.no_grad():
        packed = m(**masking.model_inputs(ids, pos, None, cu)).logits
        worst = worst_vs_alone(packed, docs, lambda d: m(input_ids=d[None], use_cache=False).logits[0])
        # the window matters here: without it a document's logits change
        full = model(family, impl, window=10**6)
        full.load_state_dict(m.state_dict())
        no_window = worst_vs_alone(packed, docs, lambda d: full(input_ids=d[None], use_cache=False).logits[0])
    assert worst <= 1e-5
    assert no_window > 1e-3


def test_the_logits_probe_catches_a_mask_without_the_window():
    m = model("mistral", "sdpa")
    good = DocMasking("mask4d", "sdpa", attention_windows(m.config))
    assert probe_logits(m, good, torch.device("cpu")) <= 1e-5
    assert attention_windows(m.config) == WINDOW
    assert probe_logits(m, DocMasking("mask4d", "sdpa", None), torch.device("cpu")) > 1e-3  # the old mask4d
    g2 = model("gemma2", "eager")
    assert attention_windows(g2.config) == {"full_attention": None, "sliding_attention": WINDOW}
    chosen = select_masking(g2, "eager", "mask4d", torch.device("cpu"))
    assert chosen.windows == attention_windows(g2.config)


def test_select_masking_refuses_in_one_line_when_the_window_is_lost():
    class NoWindow(DocMasking):  # a mode whose mask drops the window
        def model_inputs(self, input_ids, position_ids, additive_dtype=None, cu_seqlens=None):
            return DocMasking("mask4d", self.attn_implementation).model_inputs(input_ids, position_ids, additive_dtype)

    import tokentrain.model.attention as att

    m = model("starcoder2", "sdpa")
    orig = att.DocMasking
    att.DocMasking = NoWindow
    try:
        with pytest.raises(Exception) as e:
            att.select_masking(m, "sdpa", "mask4d", torch.device("cpu"))
    finally:
        att.DocMasking = orig
    msg = str(e.value)
    assert "\n" not in msg and "packed logits differ from each document alone" in msg and "window 4" in msg
