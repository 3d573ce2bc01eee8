"""No code from checkpoints, and resume across engines, through the real CLI.

A crafted `.pt` file (its pickle calls ``open(MARKER, "w")`` when unpickled) in a plain
checkpoint (optimizer.pt) and in DeepSpeed's own files (mp_rank_00_model_states.pt, the
optimizer partitions), its COMPLETE manifest rewritten to match as an attacker would: the
file is refused naming it, ``--resume auto`` falls back to the previous checkpoint, `convert`
refuses it, and the marker file never appears. A checkpoint of another engine is refused in
one line naming the engine it was written by and the flag to use. nan_policy holds on the
DeepSpeed path too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.engines.engine_helpers import Payload, clean_env, error_lines, losses, tokentrain, weights, write_cfg

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """4 steps (checkpoints at 2 and 4) with the plain engine, ZeRO-2 and ZeRO-3, one process."""
    from tokentrain.data.synth import synth_dataset
    from tokentrain.model.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("safety")
    model = make_tiny_model(root / "model", vocab_size=512, hidden_size=32, layers=2, heads=4)
    data = root / "data"
    synth_dataset(data, files=2, documents=300, seed=3, mean_length=40, vocab_size=512)
    cfg = write_cfg(root / "cfg.py", model, data)
    env = clean_env(TOKENTRAIN_CACHE=str(root / "cache"))
    out = {}
    for name, extra in (
        ("plain", []),
        ("zero2", ["--deepspeed", "deepspeed_zero2"]),
        ("zero3", ["--deepspeed", "deepspeed_zero3"]),
    ):
        work = root / name
        r = tokentrain("train", cfg, "--work-dir", work, *extra, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = work
    return dict(root=root, cfg=cfg, env=env, model=model, data=data, **out)


def craft(work: Path, rel: str, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of `work` whose step_4/`rel` carries the payload (manifest updated); the marker path."""
    from tokentrain.checkpoint.manager import manifest

    copy = tmp_path / work.name
    shutil.copytree(work, copy)
    marker = tmp_path / "PWNED"
    step = copy / "checkpoints" / "step_4"
    target = step / rel
    assert target.is_file(), sorted(p.name for p in target.parent.iterdir())
    state = torch.load(target, map_location="cpu", weights_only=False)
    state["extra"] = Payload(marker)
    torch.save(state, target)
    info = json.loads((step / "COMPLETE").read_text())
    info["files"] = manifest(step)
    (step / "COMPLETE").write_text(json.dumps(info))
    return copy, marker


CASES = [
    ("plain", "optimizer.pt", []),
    ("zero2", "ds/mp_rank_00_model_states.pt", ["--deepspeed", "deepspeed_zero2"]),
    ("zero2", "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt", ["--deepspeed", "deepspeed_zero2"]),
    ("zero3", "ds/zero_pp_rank_0_mp_rank_00_model_states.pt", ["--deepspeed", "deepspeed_zero3"]),
]


@pytest.mark.parametrize("run,rel,flags", CASES, ids=[f"{c[0]}-{Path(c[1]).name}" for c in CASES])
def test_crafted_pickle_is_refused_and_resume_auto_falls_back(runs, run, rel, flags, tmp_path):
    work, marker = craft(runs[run], rel, tmp_path)
    cfg, env = runs["cfg"], runs["env"]
    more = ["--cfg-options", "max_iters=5"]

    r = tokentrain(
        "train", cfg, "--work-dir", work, "--resume", work / "checkpoints" / "step_4", *flags, *more, env=env
    )
    assert r.returncode == 3, r.stderr[-3000:]
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and rel in lines[0] and "refused" in lines[0] and "pickled object" in lines[0], lines
    assert not marker.exists()

    r = tokentrain("train", cfg, "--work-dir", work, "--resume", "auto", *flags, *more, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "falling back to step_2" in r.stderr and rel in r.stderr
    assert "resumed from" in r.stderr and "step 2" in r.stderr
    assert not marker.exists()


@pytest.mark.parametrize("run", ["plain", "zero2"])
def test_convert_refuses_a_crafted_checkpoint(runs, run, tmp_path):
    rel = "optimizer.pt" if run == "plain" else "ds/mp_rank_00_model_states.pt"
    work, marker = craft(runs[run], rel, tmp_path)
    r = tokentrain(
        "convert", "pth_to_hf", runs["cfg"], work / "checkpoints" / "step_4", tmp_path / "hf", env=runs["env"]
    )
    assert r.returncode == 3, r.stderr[-3000:]
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and rel in lines[0] and "refused" in lines[0], lines
    assert not marker.exists() and not (tmp_path / "hf").exists()


def test_resume_across_engines_is_refused_naming_the_writer_and_the_flag(runs, tmp_path):
    cfg, env = runs["cfg"], runs["env"]
    r = tokentrain(
        "train", cfg, "--work-dir", runs["zero2"], "--resume", "auto", "--cfg-options", "max_iters=5", env=env
    )
    assert r.returncode == 2, r.stderr[-3000:]
    (line,) = error_lines(r.stderr)
    assert "written by the deepspeed engine" in line and "--deepspeed deepspeed_zero2" in line, line

    r = tokentrain(
        "train", cfg, "--work-dir", runs["plain"], "--resume", "auto", "--deepspeed", "deepspeed_zero2", env=env
    )
    assert r.returncode == 2, r.stderr[-3000:]
    (line,) = error_lines(r.stderr)
    assert "written by the local engine" in line and "no --deepspeed" in line, line

    r = tokentrain(
        "train", cfg, "--work-dir", runs["zero2"], "--resume", "auto", "--deepspeed", "deepspeed_zero3", env=env
    )
    assert r.returncode == 2, r.stderr[-3000:]
    (line,) = error_lines(r.stderr)
    assert "ZeRO stage 2" in line and "--deepspeed deepspeed_zero2" in line, line


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_policy_holds_on_the_deepspeed_path(runs, policy, tmp_path):
    cfg = write_cfg(tmp_path / "cfg.py", runs["model"], runs["data"], nan_policy=policy)
    env = dict(runs["env"], TOKENTRAIN_FAULT_INJECT="nan_loss_at_step=3")
    work = tmp_path / "w"
    r = tokentrain("train", cfg, "--work-dir", work, "--deepspeed", "deepspeed_zero2", env=env)
    if policy == "stop":
        assert r.returncode == 1, r.stderr[-3000:]
        (line,) = error_lines(r.stderr)
        assert "non-finite loss nan at step 3" in line and "nan_policy = 'skip'" in line
        assert sorted(p.name for p in (work / "checkpoints").glob("step_*")) == ["step_2"]
        return
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 3: non-finite loss nan; update skipped" in r.stderr
    assert json.loads((work / "metrics.jsonl").read_text().splitlines()[-1])["skipped_steps"] == 1
    w = weights(work)
    assert all(torch.isfinite(t).all() for t in w.values())
    assert all(x == x for x in losses(work)[3:])
