"""A tiny model, tiny data and a config writer for the metrics tests (real `tokentrain train` runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

VOCAB = 512
TT = [sys.executable, "-m", "tokentrain"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    from tokentrain.data.synth import synth_dataset
    from tokentrain.model.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("metrics")
    model = make_tiny_model(root / "tiny-llama", vocab_size=VOCAB, hidden_size=32, layers=2, heads=4)
    synth_dataset(root / "data", files=1, documents=200, seed=1, mean_length=40, vocab_size=VOCAB)
    return model, root / "data"


def write_cfg(path: Path, model, data, **over) -> Path:
    settings = dict(
        pretrained_model_name_or_path=str(model),
        dataset_folder=str(data),
        max_length=64,
        batch_size=2,
        max_iters=8,
        lr=1e-3,
        save_steps=1000,
        evaluation_freq=1000,
        log_interval=4,
        tensorboard=False,
        dtype="float32",
        seed=3,
    )
    settings.update(over)
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    return path


def train_detached(cfg: Path, work: Path, log: Path, **env_extra) -> int:
    """`tokentrain train` as under nohup: no terminal on stdin, stdout or stderr (both to a file)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_extra)
    with open(log, "w") as f:
        return subprocess.run(
            [*TT, "train", str(cfg), "--work-dir", str(work)],
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=300,
        ).returncode
