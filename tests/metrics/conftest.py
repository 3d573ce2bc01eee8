"""A config writer and a detached (no-TTY) `tokentrain train` for the metrics tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TT = [sys.executable, "-m", "tokentrain"]


@pytest.fixture(scope="session")
def tiny(tiny_model, tiny_data):
    """The shared tiny model and dataset (tests/conftest.py)."""
    return tiny_model, tiny_data


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
