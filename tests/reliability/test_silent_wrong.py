"""Cases that once trained on the wrong thing with exit 0 (issue 19, class 4), through the real
`tokentrain train`: each is now refused in one line naming the file or setting, with its
documented exit code, or done right. Listed in docs/reliability.md ("Silent-wrong and
traceback cases")."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from .helpers import checkpoints, clean_env, one_error_line, train, write_cfg

DOCS = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"


def _write_set(folder: Path, docs) -> Path:
    folder.mkdir(parents=True)
    (folder / "part-000.bin").write_text("".join(json.dumps({"tokens": d}) + "\n" for d in docs))
    return folder


def _env(tmp_path, **extra) -> dict:
    return clean_env(TOKENTRAIN_CACHE=str(tmp_path / "cache"), **extra)


# weight -> the text the error shows for it
WEIGHTS = {"inf": "inf", "nan": "nan", "10**400": "1000000000", "-1": "-1", "1e308 twice": None}


@pytest.mark.parametrize("weight", list(WEIGHTS))
def test_mixture_weights_inf_nan_or_overflowing_are_refused(weight, tiny_model, tiny_data, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other)
    if weight == "1e308 twice":  # each finite, their sum is not: still a valid mixture (1:1)
        w = [1e308, 1e308]
    else:
        w = [float(weight) if weight in ("inf", "nan") else eval(weight), 1.0]
    mix = [dict(folder=str(tiny_data), weight=w[0], name="a"), dict(folder=str(other), weight=w[1], name="b")]
    cfg = tmp_path / "run.py"
    write_cfg(cfg, tiny_model, "", datasets=mix, max_iters=2, save_steps=1000)
    cfg.write_text(cfg.read_text().replace("inf,", "float('inf'),").replace("nan,", "float('nan'),"))
    r = train(cfg, "--work-dir", tmp_path / "w", env=_env(tmp_path))
    if WEIGHTS[weight] is None:
        assert r.returncode == 0, r.stderr[-3000:]
        assert re.search(r"mixture source a: weight 0\.5000", r.stderr), r.stderr[-3000:]
        return
    one_error_line(r, 2, rf"run\.py: datasets\[0\]: 'weight' = {WEIGHTS[weight]}.*: must be a finite number > 0")
    assert not (tmp_path / "w").exists()


def test_a_mixture_source_with_no_target_token_is_refused(tiny_model, tiny_data, tmp_path):
    masked = _write_set(tmp_path / "masked", [[-(1 + (i * 7 + j) % 500) for j in range(60)] for i in range(20)])
    mix = [dict(folder=str(tiny_data), weight=3, name="good"), dict(folder=str(masked), weight=1, name="masked")]
    cfg = write_cfg(tmp_path / "run.py", tiny_model, "", datasets=mix, max_length=32, max_iters=2)
    r = train(cfg, "--work-dir", tmp_path / "w", env=_env(tmp_path))
    one_error_line(r, 3, rf"datasets\[1\] \('masked'\): folder '{masked}': no target token in any of its \d+ sample")
    assert not checkpoints(tmp_path / "w")["complete"]


def test_a_folder_reached_twice_through_a_symlink_is_read_once(tiny_model, tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data / "real")
    os.symlink("real", data / "again")
    cfg = write_cfg(tmp_path / "run.py", tiny_model, data, max_iters=1, save_steps=1000)
    r = train(cfg, "--work-dir", tmp_path / "w", env=_env(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"again: the same folder as .*real \(a symlink\); read once, not twice", r.stderr)
    fp = json.loads((tmp_path / "w" / "checkpoints" / "step_1" / "fingerprint.json").read_text())
    assert sorted(fp["dataset"]) == ["real/part-000.bin", "real/part-001.bin"]


@pytest.mark.parametrize(
    "section, body, keys",
    [
        ("scheduler", {"type": "WarmupLR", "params": {"warmup_max_lr": 0}}, "lr, warm_up_ratio, min_lr_ratio"),
        ("optimizer", {"type": "Adam", "params": {"lr": 0.1}}, "lr, betas, weight_decay"),
    ],
)
def test_a_deepspeed_optimizer_or_scheduler_section_is_refused(section, body, keys, tiny_model, tiny_data, tmp_path):
    pytest.importorskip("deepspeed")
    ds = json.loads(
        (Path(__file__).resolve().parents[2] / "src/tokentrain/configs/deepspeed/deepspeed_zero1.json").read_text()
    )
    ds[section] = body
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg = write_cfg(tmp_path / "run.py", tiny_model, tiny_data, max_iters=2)
    r = train(cfg, "--work-dir", tmp_path / "w", "--deepspeed", tmp_path / "ds.json", env=_env(tmp_path))
    kind = body["type"]
    one_error_line(r, 2, rf"--deepspeed .*ds\.json: the '{section}' section \({kind}\) is not used.*set {keys}")
    assert not (tmp_path / "w").exists()


def test_a_new_run_after_overwrite_gets_a_new_wandb_run_and_a_resume_keeps_it(tiny_model, tiny_data, tmp_path):
    pytest.importorskip("wandb")
    cfg = write_cfg(tmp_path / "run.py", tiny_model, tiny_data, max_iters=2, wandb=True)
    work = tmp_path / "w"
    env = _env(tmp_path, WANDB_MODE="offline", WANDB_SILENT="true")
    ids = []
    for extra in ([], ["--resume", "auto", "--cfg-options", "max_iters=3"], ["--overwrite"]):
        r = train(cfg, "--work-dir", work, *extra, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        ids.append((work / "wandb_run_id").read_text().strip())
    assert ids[0] == ids[1] and ids[2] != ids[0], ids
    assert len(list(work.glob(f"wandb/offline-run-*-{ids[2]}"))) == 1
