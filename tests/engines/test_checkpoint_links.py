"""No code runs from a checkpoint, whatever its layout, for every engine's format, through the CLI.

A payload (a pickle whose unpickling creates a marker file) reaches the file each engine
loads -- plain ``optimizer.pt``, DeepSpeed's ``ds/mp_rank_00_model_states.pt``, FSDP2's DCP
index ``fsdp/.metadata`` -- through a symlinked folder, a symlinked file, a hard link, or
lies behind a link in a nested folder; the COMPLETE manifest is rewritten to match, as an
attacker would. `train --resume auto` (the only checkpoint: a refusal, not a fresh start)
and `convert pth_to_hf` both exit 3 with one line, and the marker never appears. With the
pre-load check switched off (a test-only fault), DeepSpeed's own loader -- which asks for
``weights_only=False`` -- still refuses the payload: weights-only loading is forced
process-wide (checkpoint/safety.py)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from tests.engines.engine_helpers import Payload, clean_env, error_lines, tokentrain, write_cfg

pytestmark = pytest.mark.slow

FORMATS = {  # run -> (flags, the file its engine loads, relative to step_2)
    "plain": ([], "optimizer.pt"),
    "deepspeed": (["--deepspeed", "deepspeed_zero2"], "ds/mp_rank_00_model_states.pt"),
    "fsdp2": (["--engine", "fsdp2"], "fsdp/.metadata"),
}
LAYOUTS = ("linked-folder", "linked-file", "hard-link", "nested-link")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2 steps (one checkpoint, step_2) with each engine, one process."""
    from tokentrain.data.synth import synth_dataset
    from tokentrain.model.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("links")
    model = make_tiny_model(root / "model", vocab_size=512, hidden_size=32, layers=2, heads=4)
    data = root / "data"
    synth_dataset(data, files=2, documents=200, seed=3, mean_length=40, vocab_size=512)
    cfg = write_cfg(root / "cfg.py", model, data, max_iters=2)
    env = clean_env(TOKENTRAIN_CACHE=str(root / "cache"))
    works = {}
    for name, (flags, _) in FORMATS.items():
        work = root / name
        r = tokentrain("train", cfg, "--work-dir", work, *flags, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        works[name] = work
    return dict(cfg=cfg, env=env, **works)


def write_payload(path: Path, marker: Path, like: Path) -> None:
    """`path` holds the payload in the form of `like` (a torch file, or DCP's plain pickle)."""
    if like.name == ".metadata":
        path.write_bytes(pickle.dumps(Payload(marker)))
        return
    state = torch.load(like, map_location="cpu", weights_only=False)
    state["extra"] = Payload(marker)
    torch.save(state, path)


def craft(work: Path, rel: str, layout: str, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of `work` whose step_2/`rel` carries the payload through `layout`; the marker path."""
    from tokentrain.checkpoint.manager import COMPLETE, manifest

    copy = tmp_path / "work"
    shutil.copytree(work, copy, symlinks=True)
    marker = tmp_path / "PWNED"
    outside = tmp_path / "outside"
    outside.mkdir()
    step = copy / "checkpoints" / "step_2"
    target = step / rel
    if layout == "linked-folder":  # the folder holding the file (the step itself for plain) lives elsewhere
        folder = target.parent
        moved = outside / folder.name
        shutil.move(folder, moved)
        write_payload(moved / target.name, marker, moved / target.name)
        folder.symlink_to(moved, target_is_directory=True)
        step = copy / "checkpoints" / "step_2"
    elif layout in ("linked-file", "hard-link"):
        evil = outside / target.name
        write_payload(evil, marker, target)
        target.unlink()
        (target.symlink_to(evil) if layout == "linked-file" else os.link(evil, target))
    else:  # nested-link: a link deep in real folders, to a folder of payloads elsewhere
        write_payload(outside / target.name, marker, target)
        (step / "a" / "b").mkdir(parents=True)
        (step / "a" / "b" / "c").symlink_to(outside, target_is_directory=True)
    info = json.loads((step / COMPLETE).read_text())
    info["files"] = manifest(step)
    (step / COMPLETE).write_text(json.dumps(info))
    return copy, marker


def refused(r, code: int = 3) -> str:
    assert r.returncode == code, r.stderr[-3000:]
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "refused" in lines[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_payload_through_any_layout_never_runs_on_resume_or_convert(runs, fmt, layout, tmp_path):
    flags, rel = FORMATS[fmt]
    work, marker = craft(runs[fmt], rel, layout, tmp_path)
    metrics = (work / "metrics.jsonl").read_bytes()

    r = tokentrain("train", runs["cfg"], "--work-dir", work, "--resume", "auto", *flags, env=runs["env"])
    line = refused(r)
    assert "no intact checkpoint" in line and "step_2" in line, line
    assert not marker.exists()
    assert (work / "metrics.jsonl").read_bytes() == metrics and (work / "checkpoints" / "step_2").is_dir()

    out = tmp_path / "hf"
    r = tokentrain("convert", "pth_to_hf", runs["cfg"], work, out, env=runs["env"])
    refused(r)
    assert not marker.exists() and not out.exists()


@pytest.mark.deepspeed
def test_deepspeed_loader_refuses_a_payload_by_itself(runs, tmp_path):
    """The pre-load check off: DeepSpeed's torch.load(weights_only=False) is forced weights-only."""
    flags, rel = FORMATS["deepspeed"]
    work, marker = craft(runs["deepspeed"], rel, "hard-link", tmp_path)
    env = dict(runs["env"], TOKENTRAIN_FAULT_INJECT="skip_checkpoint_scan=1")
    step = work / "checkpoints" / "step_2"

    r = tokentrain("train", runs["cfg"], "--work-dir", work, "--resume", step, *flags, env=env)
    assert str(step) in refused(r)
    assert not marker.exists()

    r = tokentrain("convert", "pth_to_hf", runs["cfg"], step, tmp_path / "hf", env=env)
    refused(r)
    assert not marker.exists() and not (tmp_path / "hf").exists()


def test_an_intact_deepspeed_checkpoint_still_resumes_and_converts(runs, tmp_path):
    """Forced weights-only loading with DeepSpeed's allow-list: its real files load."""
    flags, _ = FORMATS["deepspeed"]
    work = tmp_path / "work"
    shutil.copytree(runs["deepspeed"], work)
    r = tokentrain(
        "train",
        runs["cfg"],
        "--work-dir",
        work,
        "--resume",
        "auto",
        *flags,
        "--cfg-options",
        "max_iters=3",
        env=runs["env"],
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    r = tokentrain("convert", "pth_to_hf", runs["cfg"], work, tmp_path / "hf", env=runs["env"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "hf" / "config.json").is_file()
