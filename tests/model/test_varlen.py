"""The `varlen` attention function's plumbing, on CPU: PyTorch's varlen kernel is CUDA-only,
so here it is replaced by a reference (per-document sdpa) that also records what it was
given. The kernel itself is checked on a GPU by bench/gpu_check.sh."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tokentrain.model.varlen as varlen
from tokentrain.model.attention import DocMasking, attention_windows, candidate_modes, select_masking

from .families import WINDOW, assert_loss_and_gradients_stay_in_document, model, pack, worst_vs_alone


def _reference(calls):
    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        calls.append({"cu": cu_q.tolist(), "max": max_q, "window": window_size, "gqa": enable_gqa, "scale": scale})
        assert cu_k is cu_q and max_k == max_q and window_size[1] == 0  # causal, self-attention
        assert (q.shape[1] != k.shape[1]) == enable_gqa
        out = torch.empty_like(q)
        for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            i = torch.arange(e - s)
            allowed = i[None, :] <= i[:, None]
            if window_size[0] >= 0:
                allowed &= i[None, :] >= i[:, None] - window_size[0]
            o = torch.nn.functional.scaled_dot_product_attention(
                *(t[s:e].transpose(0, 1)[None] for t in (q, k, v)),
                attn_mask=allowed,
                scale=scale,
                enable_gqa=enable_gqa,
            )
            out[s:e] = o[0].transpose(0, 1)
        return out

    return varlen_attn


@pytest.fixture
def calls(monkeypatch):
    got: list[dict] = []
    monkeypatch.setattr(varlen, "varlen_attn", _reference(got))
    return got


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma2", "phi3", "starcoder2", "gemma3"])
def test_varlen_attention_matches_each_document_alone(family, calls):
    m = model(family, varlen.VARLEN_IMPL)
    ref = model(family, "eager")
    ref.load_state_dict(m.state_dict())
    masking = DocMasking("varlen", varlen.VARLEN_IMPL, attention_windows(m.config))
    docs, ids, pos, cu = pack(m.config.vocab_size)
    with torch.no_grad():
        kw = masking.model_inputs(ids, pos, None, cu)
        packed = masking.unflatten(m(**kw).logits, ids.shape[0])
        worst = worst_vs_alone(packed, docs, lambda d: ref(input_ids=d[None], use_cache=False).logits[0])
    assert worst <= 1e-5
    assert kw["cu_seq_lens_q"].tolist() == [0, 9, 21, 28, 43, 56] and kw["max_length_q"] == 15  # the batch's own
    if family == "gemma2":  # soft-capped: computed exactly per document, the kernel is never called
        assert calls == []
        return
    assert len(calls) == m.config.num_hidden_layers
    assert all(c["cu"] == [0, 9, 21, 28, 43, 56] and c["max"] == 15 for c in calls)
    assert all(c["gqa"] for c in calls)  # 4 query heads, 2 kv heads
    assert [c["scale"] for c in calls] == pytest.approx([layer.self_attn.scaling for layer in m.model.layers])
    want = {
        "llama": [-1, -1],
        "qwen2": [-1, WINDOW - 1],
        "mistral": [WINDOW - 1, WINDOW - 1],
        "phi3": [WINDOW - 1, WINDOW - 1],
        "starcoder2": [WINDOW - 1, WINDOW - 1],
        "gemma3": [WINDOW - 1, -1],
    }[family]
    assert [c["window"][0] for c in calls] == want  # per layer: qwen2's layer 0 is full, layer 1 sliding


def test_varlen_loss_and_gradients_stay_in_each_document(calls):
    m = model("qwen2", varlen.VARLEN_IMPL)
    assert_loss_and_gradients_stay_in_document(m, DocMasking("varlen", varlen.VARLEN_IMPL, attention_windows(m.config)))
    assert calls  # the kernel ran


def test_varlen_is_chosen_by_the_probes_and_refuses_without_cu_seqlens(calls):
    m = model("mistral", varlen.VARLEN_IMPL)
    assert candidate_modes(varlen.VARLEN_IMPL, "auto") == ["varlen"]
    assert select_masking(m, varlen.VARLEN_IMPL, "auto", torch.device("cpu")).mode == "varlen"
    with pytest.raises(ValueError, match="needs one flattened row and cu_seq_lens_q"):
        m(input_ids=torch.arange(3, 9)[None], use_cache=False)


@pytest.mark.slow
def test_the_gpu_checks_cpu_plumbing_run_passes(tmp_path):
    """bench/gpu_check.sh runs only where a GPU is lent, so its `--tiny` CPU run is what keeps it
    from rotting: the probes on four families, a training run through the CLI, the report."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(
        ["bash", str(root / "bench" / "gpu_check.sh"), "--tiny", "--workdir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    lines = r.stdout.splitlines()
    for family in ("llama", "mistral", "qwen2", "gemma2"):  # each probe line, and its verdict
        assert any(f"sdpa-mask {family} " in x and "packed vs alone" in x and x.endswith(" ok") for x in lines)
    assert "sdpa-mask:" in r.stdout and "tokens/s" in r.stdout
    assert "gpu check passed" in r.stdout
