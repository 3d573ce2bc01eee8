"""Checkpoints: `WORK_DIR/checkpoints/step_N`, written aside, renamed into place, `latest` last.

Layout of one checkpoint::

    step_N/
      model.safetensors     weights (fp32 master copy)           -- strategy.save
      optimizer.pt          optimizer state (tensors only)       -- strategy.save
      trainer_state.pt      step, scheduler, sampler, counters
      rng_rank{R}.pt        every rank's RNG states (torch, CUDA, numpy, python)
      config.json           the resolved config of the run
      COMPLETE              written last inside the folder

A checkpoint is written to ``.step_N.partial`` by all ranks (a shared file system is
assumed, as for any multi-node checkpoint), then rank 0 renames it to ``step_N`` and
atomically rewrites the ``latest`` file (one line: ``step_N``). A crash at any moment
leaves either the previous checkpoint as latest or the new one complete. Loading uses
safetensors and ``torch.load(weights_only=True)``: nothing is unpickled as code.

`--resume auto` takes `latest` if it names a complete checkpoint, else the newest complete
``step_*`` folder, else starts fresh. `--resume PATH` takes a step folder, or a work dir.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from tokentrain.errors import ConfigError
from tokentrain.utils.atomic import atomic_file

log = logging.getLogger(__name__)

LATEST = "latest"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.pt"
STEP_RE = re.compile(r"^step_(\d+)$")


# ------------------------------------------------------------------ RNG


def rng_state() -> dict:
    mt = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": mt[0], "keys": torch.from_numpy(mt[1].astype(np.int64)), "pos": int(mt[2]),
                  "has_gauss": int(mt[3]), "cached_gaussian": float(mt[4])},
        "python": _py_state_to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_lists(s):
    version, internal, gauss = s
    return [version, list(internal), gauss]


# ------------------------------------------------------------------ finding checkpoints


def step_of(path: Path) -> int | None:
    m = STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / COMPLETE).is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete step_N folders under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if step_of(p) is not None and is_complete(p)]
    return sorted(found, key=step_of)


def find_latest(root: Path) -> Path | None:
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if is_complete(target):
            return target
        log.warning("%s names %s, which is not a complete checkpoint; looking for the newest complete one", pointer, target.name)
    found = list_checkpoints(root)
    return found[-1] if found else None


def resolve_resume(resume: str | None, ckpt_root: Path) -> Path | None:
    """The checkpoint folder to resume from, or None to start fresh."""
    if not resume:
        return None
    if resume == "auto":
        found = find_latest(ckpt_root)
        if found is None:
            log.info("--resume auto: no checkpoint under %s; starting from scratch", ckpt_root)
        return found
    p = Path(resume)
    if is_complete(p):
        return p
    for root in (p / "checkpoints", p):
        found = find_latest(root) if root.is_dir() else None
        if found is not None:
            return found
    if p.is_dir() and step_of(p) is not None:
        raise ConfigError(f"--resume {resume}: checkpoint is incomplete (no {COMPLETE} marker); use another one or --resume auto")
    raise ConfigError(f"--resume {resume}: no checkpoint found there; give a step_N folder, a work dir, or 'auto'")


# ------------------------------------------------------------------ saving


class CheckpointManager:
    def __init__(self, root: Path, env, strategy, keep: int):
        self.root = Path(root)
        self.env = env
        self.strategy = strategy
        self.keep = keep  # -1: keep all

    def save(self, step: int, trainer_state: dict, config: dict) -> Path:
        final = self.root / f"step_{step}"
        tmp = self.root / f".step_{step}.partial"
        if self.env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        self.strategy.barrier()
        self.strategy.save(tmp)
        torch.save(rng_state(), tmp / f"rng_rank{self.env.rank}.pt")
        if self.env.is_main:
            torch.save(trainer_state, tmp / TRAINER_STATE)
            (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        self.strategy.barrier()
        if self.env.is_main:
            (tmp / COMPLETE).write_text(json.dumps({"step": step, "world_size": self.env.world_size}))
            _fsync_tree(tmp)
            if final.exists():  # the same step saved again (a resumed run that re-reached it)
                shutil.rmtree(final)
            os.rename(tmp, final)
            with atomic_file(self.root / LATEST, "w") as f:
                f.write(final.name + "\n")
            self.prune()
        self.strategy.barrier()
        return final

    def prune(self) -> None:
        if self.keep < 0:
            return
        found = list_checkpoints(self.root)
        for old in found[: max(0, len(found) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
            log.debug("removed old checkpoint %s", old)

    def load(self, folder: Path) -> tuple[dict, dict | None]:
        """Restore model and optimizer; return the trainer state and this rank's RNG state.

        The caller applies the RNG state (`set_rng_state`) as the very last thing before
        training continues, so nothing in between can draw from it.
        """
        self.strategy.load(folder)
        state = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)
        rng = folder / f"rng_rank{self.env.rank}.pt"
        if rng.is_file():
            return state, torch.load(rng, map_location="cpu", weights_only=True)
        log.warning("%s has no RNG state for rank %d (different world size); RNG streams restart", folder, self.env.rank)
        return state, None


def _fsync_tree(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
