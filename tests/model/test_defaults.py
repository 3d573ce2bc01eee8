"""What a user gets without setting anything: `attn_implementation='auto'` loads what the model
supports (gemma2 has no sdpa: eager, logged) and `dtype='auto'` is fp32 on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokentrain.model.lm import autocast_dtype

from .families import config

ROOT = Path(__file__).resolve().parents[2]


def test_dtype_auto_is_fp32_on_cpu():
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16


@pytest.mark.slow
def test_gemma2_trains_with_default_settings(tmp_path):
    from tokentrain.data.synth import synth_dataset
    from tokentrain.model.tiny import make_tokenizer

    model = tmp_path / "gemma2"
    cfg = config("gemma2")
    cfg.vocab_size = 512
    cfg.save_pretrained(model)  # config only: trained from random init
    make_tokenizer(512).save_pretrained(model)
    data = tmp_path / "data"
    synth_dataset(data, files=1, documents=40, seed=1, mean_length=40, vocab_size=512)
    conf = tmp_path / "train.py"
    conf.write_text(
        f"pretrained_model_name_or_path = {str(model)!r}\ndataset_folder = {str(data)!r}\n"
        "max_length = 64\nbatch_size = 1\nmax_epochs = 1\nsave_steps = 1000\nevaluation_freq = 1000\n"
        "evaluation_inputs = []\nlog_interval = 1\ntensorboard = False\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TOKENTRAIN_CACHE=str(tmp_path / "cache"))
    r = subprocess.run(
        [sys.executable, "-m", "tokentrain", "train", str(conf), "--work-dir", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "does not support" in log and "attn_implementation = 'eager' instead" in log  # the fallback, logged
    assert "eager attention" in log and "compute float32" in log
    steps = [json.loads(x) for x in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [s["loss"] for s in steps if "loss" in s]
    assert len(losses) >= 2 and all(x == x for x in losses)  # trained, finite


def test_auto_attention_falls_back_to_what_the_model_supports(tmp_path, caplog):
    import logging

    from tokentrain.errors import ConfigError
    from tokentrain.model.attention import choose_attn_implementation
    from tokentrain.model.lm import load_model

    cpu = torch.device("cpu")
    assert choose_attn_implementation("auto", cpu, None) == "sdpa"
    with pytest.raises(ConfigError, match="attn_implementation = 'varlen' needs torch.nn.attention.varlen"):
        choose_attn_implementation("varlen", cpu, None)
    config("gemma2").save_pretrained(tmp_path / "g2")
    # Asked for sdpa by name: refused, one line -- by tokentrain, whatever transformers does (5.17
    # loads gemma2 with sdpa and drops the cap).
    with pytest.raises(ConfigError, match="soft-caps its attention scores .* which sdpa does not support"):
        load_model(str(tmp_path / "g2"), False, "sdpa", cpu)
    with caplog.at_level(logging.INFO, logger="tokentrain.model.lm"):
        m = load_model(str(tmp_path / "g2"), False, "sdpa", cpu, fallback="eager")
    assert m.config._attn_implementation == "eager"
    assert "attn_implementation = 'eager' instead" in caplog.text


def test_a_soft_capped_model_runs_capped_outside_training(tmp_path):
    """chat loads the model itself, with transformers' default attention -- sdpa for gemma2 in
    transformers 5.17, which drops the cap: a soft-capped model gets eager there instead."""
    from transformers import AutoModelForCausalLM

    from tokentrain.model.inference import ModelSource, load_for_inference
    from tokentrain.model.tiny import make_tokenizer

    cfg = config("gemma2")
    cfg.vocab_size = 512
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "g2")
    make_tokenizer(512).save_pretrained(tmp_path / "g2")
    model, _ = load_for_inference(ModelSource(str(tmp_path / "g2")), torch.device("cpu"), "float32")
    assert model.config._attn_implementation == "eager"
    llama = config("llama")  # a model without a cap keeps transformers' default
    llama.vocab_size = 512
    AutoModelForCausalLM.from_config(llama).save_pretrained(tmp_path / "llama")
    make_tokenizer(512).save_pretrained(tmp_path / "llama")
    model, _ = load_for_inference(ModelSource(str(tmp_path / "llama")), torch.device("cpu"), "float32")
    assert model.config._attn_implementation == "sdpa"
