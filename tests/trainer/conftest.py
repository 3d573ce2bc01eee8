"""Fixtures of the trainer tests: a tiny Llama folder (random weights, offline byte-level
tokenizer) and tiny synthetic InternLM-format datasets, built once per session."""

from __future__ import annotations

import os

import pytest

VOCAB = 512


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TOKENTRAIN_CACHE", str(tmp_path_factory.mktemp("tt_cache")))


@pytest.fixture(scope="session", autouse=True)
def _quiet_and_small():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from tokentrain.model.tiny import make_tiny_model

    return make_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny-llama", vocab_size=VOCAB, hidden_size=32, layers=2, heads=4
    )


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """~16k tokens: 126 packs of 128 tokens, documents of ~40 tokens (several per pack)."""
    from tokentrain.data.synth import synth_dataset

    out = tmp_path_factory.mktemp("data") / "train"
    synth_dataset(out, files=2, documents=400, seed=1, mean_length=40, vocab_size=VOCAB)
    return out


@pytest.fixture(scope="session")
def val_data(tmp_path_factory):
    from tokentrain.data.synth import synth_dataset

    out = tmp_path_factory.mktemp("data") / "val"
    synth_dataset(out, files=1, documents=40, seed=2, mean_length=40, vocab_size=VOCAB)
    return out
