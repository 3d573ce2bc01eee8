"""Shared by the engine tests: a child run's environment, configs, the CLI, reading results back."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.reliability.helpers import clean_env as clean_env  # one child environment for every suite
from tests.reliability.helpers import error_lines as error_lines
from tests.reliability.helpers import torchrun_cmd as torchrun_cmd

TT = [sys.executable, "-m", "tokentrain"]

SETTINGS = dict(
    max_length=128,
    batch_size=1,
    accumulative_counts=2,
    max_iters=4,
    lr=1e-3,
    warm_up_ratio=0.25,
    save_steps=2,
    save_total_limit=-1,
    evaluation_freq=1000,
    evaluation_inputs=[],
    log_interval=1,
    tensorboard=False,
    dtype="float32",
    seed=7,
)


def write_cfg(path: Path, model, data, **over) -> Path:
    settings = dict(SETTINGS, pretrained_model_name_or_path=str(model), dataset_folder=str(data))
    settings.update(over)
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    return path


def scratch_job(root: Path, **over) -> tuple[Path, dict]:
    """Training from scratch: a tied config-only tiny Llama, its data and config under `root`;
    (the config, the child runs' environment)."""
    from tests.helpers import config_only
    from tokentrain.data.synth import synth_dataset
    from tokentrain.model.tiny import make_tiny_model

    built = make_tiny_model(root / "built", vocab_size=512, hidden_size=32, layers=2, heads=4,
                            tie_word_embeddings=True)  # fmt: skip
    model = config_only(built, root / "scratch")
    synth_dataset(root / "data", files=2, documents=300, seed=3, mean_length=40, vocab_size=512)
    return write_cfg(root / "cfg.py", model, root / "data", **over), clean_env(TOKENTRAIN_CACHE=str(root / "cache"))


def tokentrain(*args, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TT, *map(str, args)], env=env or clean_env(), capture_output=True, text=True, timeout=timeout
    )


def weights(work: Path) -> dict:
    return load_file(str(Path(work) / "hf" / "model.safetensors"))


def losses(work: Path) -> list[float]:
    return [json.loads(r)["loss"] for r in (Path(work) / "metrics.jsonl").read_text().splitlines() if r.strip()]


def rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).norm() / max(b[k].double().norm(), 1e-12)) for k in a)


def copy_checkpoint(src: Path, work: Path) -> Path:
    """A new work dir holding only `src` (a step_N folder) as its latest checkpoint."""
    dst = work / "checkpoints" / src.name
    shutil.copytree(src, dst)
    (work / "checkpoints" / "latest").write_text(src.name + "\n")
    return dst


def logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(ids).logits


class Payload:
    """Unpickling this creates the marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
