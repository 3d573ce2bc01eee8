"""Shared helpers of the trainer tests: write configs, run the trainer in-process, read results."""

from __future__ import annotations

import json
from pathlib import Path

import torch

BASE = dict(
    max_length=128,
    pack_to_max_length=True,
    batch_size=1,
    accumulative_counts=1,
    dataloader_num_workers=0,
    max_epochs=1,
    lr=1e-3,
    warm_up_ratio=0.0,
    save_steps=1000,
    save_total_limit=-1,
    evaluation_freq=1000,
    evaluation_inputs=[],
    log_interval=1,
    tensorboard=False,
    dtype="float32",
    seed=7,
)


def write_config(path: Path, **settings) -> Path:
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    return path


def make_config(model: Path, data: Path, **overrides):
    from tokentrain.config.loader import build_config

    settings = dict(BASE, pretrained_model_name_or_path=str(model), dataset_folder=str(data))
    settings.update(overrides)
    return build_config(settings, "<test>")


def local_env():
    from tokentrain.distributed.env import DistEnv

    return DistEnv(0, 1, 0, 1, torch.device("cpu"), "gloo")


def train(cfg, work_dir: Path, resume=None, env=None) -> int:
    from tokentrain.training.trainer import Trainer

    t = Trainer(cfg.replace(work_dir=str(work_dir)), env or local_env(), Path(work_dir), resume)
    t.setup()
    return t.fit()


def config_only(model: Path, out: Path) -> Path:
    """A copy of the model folder `model` without its weights (config and tokenizer): what a
    user trains from scratch."""
    import shutil

    out.mkdir(parents=True)
    for f in Path(model).iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)
    return out


def checkpoint_weights(work_dir: Path, step: int | None = None) -> dict:
    from safetensors.torch import load_file

    root = Path(work_dir) / "checkpoints"
    name = f"step_{step}" if step is not None else (root / "latest").read_text().strip()
    return load_file(str(root / name / "model.safetensors"))


def metrics(work_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(work_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def max_rel_diff(a: dict, b: dict) -> float:
    """Largest per-tensor relative difference ||a - b|| / ||b||."""
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        d = (a[k].double() - b[k].double()).norm().item()
        worst = max(worst, d / max(b[k].double().norm().item(), 1e-30))
    return worst
