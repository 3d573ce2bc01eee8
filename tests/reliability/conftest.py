"""Fixtures of the reliability tests: a tiny model, a tiny dataset, and the real CLI in a subprocess."""

from __future__ import annotations

import os

import pytest

VOCAB = 512


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TOKENTRAIN_CACHE", str(tmp_path_factory.mktemp("tt_cache")))
    monkeypatch.delenv("TOKENTRAIN_FAULT_INJECT", raising=False)


@pytest.fixture(scope="session", autouse=True)
def _quiet():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from tokentrain.model.tiny import make_tiny_model

    return make_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny-llama", vocab_size=VOCAB, hidden_size=32, layers=2, heads=4
    )


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """~12k tokens in 2 files: 96 packs of 128 tokens."""
    from tokentrain.data.synth import synth_dataset

    out = tmp_path_factory.mktemp("data") / "train"
    synth_dataset(out, files=2, documents=300, seed=1, mean_length=40, vocab_size=VOCAB)
    return out


# slurm_cluster: the session fixture of tests/conftest.py (one Slurm for every suite).
