"""The varlen mode as a user meets it, on CPU: ``tokentrain train`` with the default config,
PyTorch's kernel replaced (``TOKENTRAIN_VARLEN_KERNEL``) by a stand-in with one torch
release's exact signature that computes the reference result. Each release trains like sdpa;
a kernel that fails a probe makes ``auto`` switch to the next implementation, logged, while an
explicit request fails in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engines.engine_helpers import clean_env, error_lines, losses, tokentrain, write_cfg

ROOT = Path(__file__).resolve().parents[2]
STANDINS = "tests.model.varlen_standins"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    from tokentrain.data.synth import synth_dataset
    from tokentrain.model.tiny import llama_config, make_tokenizer

    root = tmp_path_factory.mktemp("varlen_cli")
    for name, window in (("llama", None), ("mistral", 8)):  # GQA: 4 query heads, 2 kv heads; config only
        cfg = llama_config(512, 32, 2, 4, kv_heads=2)
        if window:
            from transformers import MistralConfig

            cfg = MistralConfig(**{**cfg.to_diff_dict(), "model_type": "mistral", "sliding_window": window})
        cfg.save_pretrained(root / name)
        make_tokenizer(512).save_pretrained(root / name)
    synth_dataset(root / "data", files=1, documents=200, seed=3, mean_length=30, vocab_size=512)
    return root


def run(job: Path, name: str, model: str = "llama", kernel: str | None = None, **over):
    """Train 3 steps with the default attention settings (plus `over`); the process's result."""
    cfg = write_cfg(job / f"{name}.py", job / model, job / "data", max_iters=3, save_steps=1000, **over)
    extra = {"TOKENTRAIN_CACHE": str(job / "cache"), "PYTHONPATH": str(ROOT)}
    if kernel:
        extra["TOKENTRAIN_VARLEN_KERNEL"] = f"{STANDINS}:{kernel}"
    return tokentrain("train", cfg, "--work-dir", job / name, env=clean_env(**extra))


def test_each_releases_signature_trains_the_default_config_through_varlen_like_sdpa(job):
    ref = run(job, "sdpa", attn_implementation="sdpa")
    assert ref.returncode == 0, ref.stderr[-2000:]
    want = losses(job / "sdpa")
    for release in ("torch_2_10", "torch_2_11", "torch_2_12"):
        r = run(job, release, kernel=release)
        assert r.returncode == 0, r.stderr[-2000:]
        log = r.stdout + r.stderr
        assert "tokentrain_varlen attention, documents kept apart by varlen" in log, log[-2000:]
        assert "loss fused chunked" in log  # the fused head's check ran with the varlen inputs
        got = losses(job / release)
        assert len(got) == len(want) == 3
        assert max(abs(a - b) / abs(b) for a, b in zip(got, want)) <= 1e-5, (release, got, want)


@pytest.mark.parametrize("model", ["llama", "mistral"])
def test_micro_batches_of_several_rows_train_through_varlen_like_sdpa(job, model):
    """batch_size > 1 under varlen: the rows are flattened into one sequence of documents (a GQA
    model, and a windowed one)."""
    for name, over in (("sdpa", {"attn_implementation": "sdpa"}), ("varlen", {"kernel": "torch_2_12"})):
        r = run(job, f"{model}_{name}_b2", model=model, batch_size=2, **over)
        assert r.returncode == 0, r.stderr[-2000:]
    assert "documents kept apart by varlen" in r.stdout + r.stderr
    got, want = losses(job / f"{model}_varlen_b2"), losses(job / f"{model}_sdpa_b2")
    assert len(got) == len(want) == 3
    assert max(abs(a - b) / abs(b) for a, b in zip(got, want)) <= 1e-5, (got, want)


def test_auto_moves_on_from_a_kernel_that_fails_a_probe_and_an_explicit_request_fails(job):
    r = run(job, "bidi", kernel="bidirectional")  # ignores the causal window
    assert r.returncode == 0, r.stderr[-2000:]
    log = r.stdout + r.stderr
    assert "attention: tokentrain_varlen, varlen: not causal" in log and "training with sdpa" in log
    assert "sdpa attention" in log and len(losses(job / "bidi")) == 3
    r = run(job, "bidi_explicit", kernel="bidirectional", attn_implementation="varlen")
    assert r.returncode == 2
    [line] = error_lines(r.stderr)
    assert "cannot keep documents apart with attn_implementation='tokentrain_varlen'" in line
    assert "not causal" in line


def test_torch_2_10_has_no_window_so_a_windowed_model_falls_back(job):
    r = run(job, "mistral_2_10", model="mistral", kernel="torch_2_10")
    assert r.returncode == 0, r.stderr[-2000:]
    log = r.stdout + r.stderr
    assert "WindowUnsupported" in log and "training with sdpa" in log
    r = run(job, "mistral_2_11", model="mistral", kernel="torch_2_11")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "documents kept apart by varlen" in r.stdout + r.stderr
