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

from . import varlen_standins as standins
from .families import WINDOW, assert_loss_and_gradients_stay_in_document, model, pack, worst_vs_alone


@pytest.fixture(params=["torch_2_10", "torch_2_11", "torch_2_12"])
def calls(request, monkeypatch):
    """The varlen kernel replaced by a stand-in of one torch release's signature; its calls."""
    standins.CALLS.clear()
    monkeypatch.setattr(varlen, "KERNEL", varlen.KernelCall.of(getattr(standins, request.param)))
    monkeypatch.setattr(varlen, "STANDIN", True)
    standins.CALLS.release = request.param
    return standins.CALLS


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma2", "phi3", "starcoder2", "gemma3"])
def test_varlen_attention_matches_each_document_alone(family, calls):
    """Through the real model, for each release's signature: the kernel gets the batch's own
    boundaries, causality, the layer's window and scale, and GQA as that release wants them."""
    m = model(family, varlen.VARLEN_IMPL)
    ref = model(family, "eager")
    ref.load_state_dict(m.state_dict())
    masking = DocMasking("varlen", varlen.VARLEN_IMPL, attention_windows(m.config))
    docs, ids, pos, cu = pack(m.config.vocab_size)
    windowed = family != "llama" and family != "gemma2"
    with torch.no_grad():
        kw = masking.model_inputs(ids, pos, None, cu)
        if calls.release == "torch_2_10" and windowed:  # no window_size in 2.10: refused, never ignored
            with pytest.raises(varlen.WindowUnsupported, match="sliding windows need torch >= 2.11"):
                m(**kw)
            return
        packed = masking.unflatten(m(**kw).logits, ids.shape[0])
        worst = worst_vs_alone(packed, docs, lambda d: ref(input_ids=d[None], use_cache=False).logits[0])
    assert worst <= 1e-5
    assert kw["cu_seq_lens_q"].tolist() == [0, 9, 21, 28, 43, 56] and kw["max_length_q"] == 15  # the batch's own
    if family == "gemma2":  # soft-capped: computed exactly per document, the kernel is never called
        assert calls == []
        return
    assert len(calls) == m.config.num_hidden_layers
    assert all(c["cu"] == [0, 9, 21, 28, 43, 56] and c["max"] == 15 for c in calls)
    assert all(c["heads"] == (4, 2) for c in calls)  # GQA: 4 query heads, 2 kv heads, never repeated
    scales = [c["scale"] for c in calls]
    if calls.release == "torch_2_10":  # no scale argument: folded into q, the kernel's default
        assert scales == [None] * len(calls)
    else:
        assert scales == pytest.approx([layer.self_attn.scaling for layer in m.model.layers])
    want = {
        "llama": [-1, -1],
        "qwen2": [-1, WINDOW - 1],
        "mistral": [WINDOW - 1, WINDOW - 1],
        "phi3": [WINDOW - 1, WINDOW - 1],
        "starcoder2": [WINDOW - 1, WINDOW - 1],
        "gemma3": [WINDOW - 1, -1],
    }[family]
    assert [c["window"] for c in calls] == [(w, 0) for w in want]  # causal; per layer: qwen2's 0 full, 1 sliding


def test_a_model_scale_other_than_the_default_reaches_every_release():
    """gemma's query_pre_attn_scalar makes the scale differ from 1/sqrt(D): 2.10 has no `scale`,
    so q is pre-scaled; the result equals the release that takes it."""
    q, k, v = (torch.randn(10, h, 8) for h in (4, 2, 2))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    outs = [
        varlen.KernelCall.of(getattr(standins, r))(q, k, v, cu, 6, 0.05, -1)
        for r in ("torch_2_10", "torch_2_11", "torch_2_12")
    ]
    assert (outs[0] - outs[1]).abs().max() <= 1e-6 and torch.equal(outs[1], outs[2])


def test_a_kernel_without_a_causal_argument_is_refused_by_name():
    def odd(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k):
        return query

    with pytest.raises(TypeError, match="neither window_size nor is_causal"):
        varlen.KernelCall.of(odd)


def test_a_bidirectional_kernel_is_refused_by_the_causality_probe(monkeypatch):
    """A kernel that ignores the window keeps documents apart and packed equals alone: only the
    causality probe sees it. An explicit request fails naming it."""
    from tokentrain.errors import ConfigError
    from tokentrain.model.attention import probe_causality, probe_isolation, probe_logits

    monkeypatch.setattr(varlen, "KERNEL", varlen.KernelCall.of(standins.bidirectional))
    monkeypatch.setattr(varlen, "STANDIN", True)
    m = model("llama", varlen.VARLEN_IMPL)
    masking = DocMasking("varlen", varlen.VARLEN_IMPL, None)
    cpu = torch.device("cpu")
    assert probe_isolation(m, masking, cpu) == 0.0 and probe_logits(m, masking, cpu) <= 1e-5
    assert probe_causality(m, masking, cpu) > 1e-4
    with pytest.raises(ConfigError, match="varlen.*not causal: outputs depend on later tokens"):
        select_masking(m, varlen.VARLEN_IMPL, "auto", cpu)


def test_auto_switches_a_failing_implementation_to_the_next_and_logs_it(monkeypatch, caplog):
    import logging

    monkeypatch.setattr(varlen, "KERNEL", varlen.KernelCall.of(standins.bidirectional))
    monkeypatch.setattr(varlen, "STANDIN", True)
    m = model("qwen2", varlen.VARLEN_IMPL)
    with caplog.at_level(logging.WARNING, logger="tokentrain.model.attention"):
        chosen = select_masking(m, varlen.VARLEN_IMPL, "auto", torch.device("cpu"), fallback=True)
    assert (chosen.attn_implementation, chosen.mode) == ("sdpa", "positions")
    assert m.config._attn_implementation == "sdpa"  # the loaded model itself was switched
    [line] = [r.getMessage() for r in caplog.records]
    assert "tokentrain_varlen, varlen: not causal" in line and "training with sdpa" in line


def test_varlen_loss_and_gradients_stay_in_each_document(calls):
    m = model("llama" if calls.release == "torch_2_10" else "qwen2", varlen.VARLEN_IMPL)  # 2.10: no windows
    assert_loss_and_gradients_stay_in_document(m, DocMasking("varlen", varlen.VARLEN_IMPL, attention_windows(m.config)))
    assert calls  # the kernel ran


def test_varlen_is_chosen_by_the_probes_and_refuses_without_cu_seqlens(calls):
    from tokentrain.errors import ConfigError

    m = model("mistral", varlen.VARLEN_IMPL)
    assert candidate_modes(varlen.VARLEN_IMPL, "auto") == ["varlen"]
    if calls.release == "torch_2_10":  # a windowed model: refused in one line, never trained unwindowed
        with pytest.raises(ConfigError, match="sliding windows need torch >= 2.11"):
            select_masking(m, varlen.VARLEN_IMPL, "auto", torch.device("cpu"))
        m = model("llama", varlen.VARLEN_IMPL)
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
        assert any(
            f"sdpa-mask {family} " in x
            and "gradient from later tokens 0," in x
            and "packed vs alone" in x
            and x.endswith(" ok")
            for x in lines
        )
    for run in ("local", "ddp, torchrun 1"):  # (d) the tiny demo under an engine, its verdict
        assert any(x.strip().startswith(run) and "exit 0, losses" in x and x.endswith(" ok") for x in lines)
    (same,) = [x for x in lines if "same start: init digest(s) " in x]  # one digest, equal first losses
    assert same.endswith(" ok") and len(same.split("digest(s) ")[1].split(";")[0].split()) == 1, same
    assert "sdpa-mask:" in r.stdout and "tokens/s" in r.stdout
    assert "gpu check passed" in r.stdout
