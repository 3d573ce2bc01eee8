"""The real `tokentrain train` in a subprocess, configs, and reading a work dir back."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

TT = [sys.executable, "-m", "tokentrain"]
BIN = str(Path(sys.executable).with_name("tokentrain"))

BASE = dict(
    max_length=128,
    pack_to_max_length=True,
    batch_size=2,
    accumulative_counts=1,
    dataloader_num_workers=0,
    max_iters=12,
    lr=1e-3,
    warm_up_ratio=0.1,
    save_steps=2,
    save_total_limit=-1,
    evaluation_freq=1000,
    evaluation_inputs=[],
    log_interval=1,
    tensorboard=False,
    dtype="float32",
    seed=3,
)


def write_cfg(path: Path, model, data, **over) -> Path:
    settings = dict(BASE, pretrained_model_name_or_path=str(model), dataset_folder=str(data))
    settings.update(over)
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    return path


def clean_env(faults: str | None = None, **extra) -> dict:
    """The environment of a child run: no launcher variables from the outside, one thread."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            (
                "SLURM_",
                "MASTER_",
                "RANK",
                "WORLD_SIZE",
                "LOCAL_",
                "TORCHELASTIC",
                "NPROC_PER_NODE",
                "TOKENTRAIN_FAULT_INJECT",
                "TOKENTRAIN_EXIT_DIR",
            )
        )
    }
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", **extra)
    if faults:
        env["TOKENTRAIN_FAULT_INJECT"] = faults
    return env


def torchrun_cmd(*args, nproc: int = 2) -> list[str]:
    """`torchrun --nproc_per_node=N -m tokentrain.train ARGS --launcher pytorch` on a free port."""
    from tokentrain.distributed.spawn import _free_port

    run = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}"]
    return [*run, "-m", "tokentrain.train", *map(str, args), "--launcher", "pytorch"]


def train(*args, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TT, "train", *map(str, args)], env=env or clean_env(), capture_output=True, text=True, timeout=timeout
    )


def error_lines(stderr: str) -> list[str]:
    return [x for x in stderr.splitlines() if x.startswith("tokentrain:")]


def metrics(work: Path) -> list[dict]:
    """The records of complete lines: tests read the file while a run appends to it."""
    p = Path(work) / "metrics.jsonl"
    try:
        lines = p.read_text().split("\n")[:-1]  # the last piece has no newline yet (or is empty)
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def losses(work: Path) -> list[float]:
    return [r["loss"] for r in metrics(work)]


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def wait_for(cond, proc: subprocess.Popen | None = None, timeout: float = 120, poll: float = 0.01) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the condition was met")
        if time.time() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(poll)


def written_since(path: Path, since: float) -> bool:
    """Whether `path` is a file written at or after `since`; False while it is missing.

    Checked in one `stat`: a run that removes a leftover `.step_N.partial` (from an earlier
    kill) before refilling it may delete the file between an `is_file()` and a `stat()`."""
    try:
        return path.stat().st_mtime >= since
    except FileNotFoundError:
        return False


def checkpoints(work: Path) -> dict:
    """What a later run would see: the `latest` pointer, complete step folders, partial leftovers."""
    root = Path(work) / "checkpoints"
    if not root.is_dir():
        return {"latest": None, "complete": [], "partial": [], "incomplete": []}
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    steps = sorted((p for p in root.glob("step_*")), key=lambda p: int(p.name[5:]))
    return {
        "latest": latest,
        "complete": [p.name for p in steps if (p / "COMPLETE").is_file()],
        "incomplete": [p.name for p in steps if not (p / "COMPLETE").is_file()],
        "partial": sorted(p.name for p in root.glob(".step_*.partial")),
    }


def one_error_line(r, code: int, pattern: str) -> str:
    """The run exited with `code` and said why in exactly one line matching `pattern` (no
    traceback, no internal error); that line."""
    lines = error_lines(r.stderr)
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("tokentrain: error: "), r.stderr[-3000:]
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]
