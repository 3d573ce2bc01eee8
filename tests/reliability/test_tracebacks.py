"""A user's situation that once ended in a traceback or `internal error` (issue 19, class 5),
through the real CLI in subprocesses: each is one line naming the path and what to do, with
its documented exit code (or, where it can, the run goes on, logged). Listed in
docs/reliability.md ("Silent-wrong and traceback cases")."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from .helpers import TT, checkpoints, clean_env, one_error_line, train, write_cfg

DOCS = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"


def _mount(path: Path, *opts: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(opts), "tmpfs", str(path)], capture_output=True)
    assert r.returncode == 0, f"cannot mount a tmpfs here (the test needs root): {r.stderr.decode().strip()}"


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _tt(*args, tmp_path) -> subprocess.CompletedProcess:
    env = clean_env(TOKENTRAIN_CACHE=str(tmp_path / "cache"))
    return subprocess.run([*TT, *map(str, args)], env=env, capture_output=True, text=True, timeout=300)


def _lock_dir(w, t):
    (w / ".tokentrain.lock").mkdir(parents=True)


def _lock_link(w, t):
    w.mkdir()
    (t / "precious").write_text("keep me")
    os.symlink(t / "precious", w / ".tokentrain.lock")


def _owner_dir(w, t):
    (w / ".tokentrain.owner.json").mkdir(parents=True)


def _owner_link(w, t):
    w.mkdir()
    (t / "precious").write_text("keep me")
    os.symlink(t / "precious", w / ".tokentrain.owner.json")


# case -> (what to do to the work dir before `train`, regex of the one line)
LOCK_CASES = {
    "lock file is a folder": (_lock_dir, r"\.tokentrain\.lock is a folder, not tokentrain's lock file; remove it"),
    "lock file is a symlink": (_lock_link, r"\.tokentrain\.lock is a symlink, not tokentrain's lock file; remove it"),
    "owner file is a folder": (_owner_dir, r"\.tokentrain\.owner\.json is a folder, not tokentrain's owner file"),
    "owner file is a symlink": (_owner_link, r"\.tokentrain\.owner\.json is a symlink, not tokentrain's owner"),
}


@pytest.mark.parametrize("case", list(LOCK_CASES))
def test_a_lock_or_owner_file_that_is_a_folder_or_symlink_isone_error_line(case, tiny_model, tiny_data, tmp_path):
    make, pattern = LOCK_CASES[case]
    work = tmp_path / "w"
    make(work, tmp_path)
    cfg = write_cfg(tmp_path / "run.py", tiny_model, tiny_data, max_iters=2)
    r = train(cfg, "--work-dir", work, env=clean_env(TOKENTRAIN_CACHE=str(tmp_path / "cache")))
    one_error_line(r, 2, rf"--work-dir .*w: .*{pattern}")
    if (tmp_path / "precious").exists():
        assert (tmp_path / "precious").read_text() == "keep me"
    assert not checkpoints(work)["complete"]


@pytest.mark.parametrize("pointer", [b"\xff\xfe\x00garbage\n", b"../../elsewhere/step_9\n", b"step_x" * 100])
def test_a_garbage_latest_pointer_falls_back_to_the_newest_complete_checkpoint(
    pointer, tiny_model, tiny_data, tmp_path
):
    env = clean_env(TOKENTRAIN_CACHE=str(tmp_path / "cache"))
    work = tmp_path / "w"
    assert (
        train(
            write_cfg(tmp_path / "run.py", tiny_model, tiny_data, max_iters=2), "--work-dir", work, env=env
        ).returncode
        == 0
    )
    (work / "checkpoints" / "latest").write_bytes(pointer)
    r = train(
        write_cfg(tmp_path / "run.py", tiny_model, tiny_data, max_iters=4),
        "--work-dir",
        work,
        "--resume",
        "auto",
        env=env,
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "names no step_N folder (garbage)" in r.stderr and re.search(r"resumed from .*step_2 at step 2", r.stderr)
    assert checkpoints(work)["latest"] == "step_4"


def test_a_240_character_data_file_name_trains_and_a_too_long_work_dir_isone_error_line(
    tiny_model, tiny_data, tmp_path
):
    data = tmp_path / "data"
    data.mkdir()
    long = "d" * 246 + ".bin"  # its meta (`.meta`) still fits 255 bytes, its temporary file did not
    (data / long).write_bytes((tiny_data / "part-000.bin").read_bytes())
    cfg = write_cfg(tmp_path / "run.py", tiny_model, data, max_iters=1, save_steps=1000)
    env = clean_env(TOKENTRAIN_CACHE=str(tmp_path / "cache"))
    r = train(cfg, "--work-dir", tmp_path / "w", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (data / (long + ".meta")).is_file()
    r = train(cfg, "--work-dir", tmp_path / ("w" * 300), env=env)
    one_error_line(r, 2, r"w{10,}: File name too long; use a shorter file or folder name")


def test_copy_cfg_into_a_read_only_folder_isone_error_line(tmp_path):
    ro = tmp_path / "ro"
    _mount(ro, "ro", "size=1m")
    try:
        r = _tt("copy-cfg", "tiny_demo", ro, tmp_path=tmp_path)
        one_error_line(
            r, 2, rf"copy-cfg: cannot write {ro}/tiny_demo_copy\.py \(Read-only file system\); give a folder"
        )
    finally:
        _umount(ro)


def test_plot_into_a_missing_folder_isone_error_line(tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    (work / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "lr": 1e-3}) + "\n")
    r = _tt("plot", work, "-o", tmp_path / "nowhere" / "m.png", tmp_path=tmp_path)
    one_error_line(r, 2, r"-o .*nowhere/m\.png: the folder .*nowhere does not exist; create it")


def _rewrite_manifest(step: Path) -> None:
    """As a checkpoint written by something else would be: its manifest agrees with its files."""
    from tokentrain.checkpoint.manager import manifest

    info = json.loads((step / "COMPLETE").read_text())
    info["files"] = manifest(step)
    (step / "COMPLETE").write_text(json.dumps(info))


@pytest.mark.slow
def test_deepspeed_state_files_that_are_not_deepspeeds_areone_error_line(tiny_model, tiny_data, tmp_path):
    pytest.importorskip("deepspeed")
    import torch

    env = clean_env(TOKENTRAIN_CACHE=str(tmp_path / "cache"))
    work = tmp_path / "w"
    cfg = write_cfg(tmp_path / "run.py", tiny_model, tiny_data, max_iters=2)
    r = train(cfg, "--work-dir", work, "--deepspeed", "deepspeed_zero1", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    step = work / "checkpoints" / "step_2"
    for f in (step / "ds").rglob("*model_states.pt"):
        torch.save({"weights": torch.zeros(2)}, f)  # a tensor dict, but not DeepSpeed's layout
    _rewrite_manifest(step)
    r = train(cfg, "--work-dir", work, "--deepspeed", "deepspeed_zero1", "--resume", str(step), env=env)
    one_error_line(r, 1, r"step_2/ds: not a DeepSpeed checkpoint this run can load \(KeyError: 'module'\); use another")


@pytest.mark.slow
def test_fsdp2_disk_full_while_saving_isone_error_line(tiny_model, tiny_data, tmp_path):
    small = tmp_path / "small"
    _mount(small, "size=600k")  # the first checkpoint (~800 kB with the optimizer state) does not fit
    try:
        cfg = write_cfg(tmp_path / "run.py", tiny_model, tiny_data, max_iters=2, save_steps=2)
        env = clean_env(TOKENTRAIN_CACHE=str(tmp_path / "cache"))
        r = train(cfg, "--work-dir", small / "w", "--engine", "fsdp2", env=env)
        one_error_line(r, 1, r"cannot write checkpoint .*\.step_2\.partial: no space left on device")
    finally:
        _umount(small)
