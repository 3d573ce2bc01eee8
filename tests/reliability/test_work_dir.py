"""A work dir belongs to one run, through the real `tokentrain train` (docs/reliability.md, "Work dir"):
a second run on a locked one is refused naming the holder, a killed run's lock is taken over,
a used one is not restarted without --resume (or --overwrite), and pruning never deletes the
checkpoint just written."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess

from .helpers import TT, checkpoints, clean_env, error_lines, metrics, train, wait_for, write_cfg


def _cfg(tmp_path, tiny_model, tiny_data, **over):
    return write_cfg(tmp_path / "run.py", tiny_model, tiny_data, **over)


def _one_line(r, code: int, pattern: str) -> str:
    lines = error_lines(r.stderr)
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1 and "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr[-3000:]
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def _long_run(cfg, work, tmp_path, faults=None):
    env = clean_env(faults, TOKENTRAIN_CACHE=str(tmp_path / "cache"))
    cmd = [*TT, "train", str(cfg), "--work-dir", str(work), "--resume", "auto"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _snapshot(work):
    root = work / "checkpoints"
    return {p.name: p.stat().st_mtime_ns for p in root.rglob("*")}


def test_a_second_run_on_a_locked_work_dir_is_refused_naming_the_holder(tiny_model, tiny_data, tmp_path):
    cfg = _cfg(tmp_path, tiny_model, tiny_data, max_iters=100000, save_steps=100000)
    work = tmp_path / "w"
    first = _long_run(cfg, work, tmp_path)
    try:
        wait_for(lambda: len(metrics(work)) >= 2, first)
        owner = json.loads((work / ".tokentrain.owner.json").read_text())
        assert owner["pid"] == first.pid
        for extra in ([], ["--resume", "auto"], ["--overwrite"]):
            r = train(cfg, "--work-dir", work, *extra, env=clean_env(TOKENTRAIN_CACHE=str(tmp_path / "cache")))
            _one_line(r, 2, rf"--work-dir .*w is in use by pid {first.pid} on .*; wait for that run to end")
        assert first.poll() is None  # the refused runs touched nothing of the first one
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 75, err[-2000:]
    steps = [r["step"] for r in metrics(work) if "step" in r]
    assert steps == sorted(set(steps)) and steps[0] == 1  # one run's records only
    assert not (work / ".tokentrain.owner.json").exists()  # released on exit


def test_the_lock_of_a_killed_run_is_taken_over_and_logged(tiny_model, tiny_data, tmp_path):
    cfg = _cfg(tmp_path, tiny_model, tiny_data, max_iters=8)
    work = tmp_path / "w"
    first = _long_run(cfg, work, tmp_path, faults="save_sleep=30")
    try:
        wait_for(lambda: (work / "checkpoints").is_dir() and any((work / "checkpoints").iterdir()), first)
    finally:
        first.kill()
        first.wait()
    assert (work / ".tokentrain.owner.json").is_file()  # left behind: a kill -9 runs no clean-up
    r = train(cfg, "--work-dir", work, "--resume", "auto", env=clean_env(TOKENTRAIN_CACHE=str(tmp_path / "cache")))
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(rf"taking over from a run that ended without releasing it \(pid {first.pid} on ", r.stderr)


def test_a_used_work_dir_is_not_restarted_without_resume_and_overwrite_clears_it(tiny_model, tiny_data, tmp_path):
    cfg = _cfg(tmp_path, tiny_model, tiny_data, max_iters=4)
    work = tmp_path / "w"
    env = clean_env(TOKENTRAIN_CACHE=str(tmp_path / "cache"))
    assert train(cfg, "--work-dir", work, env=env).returncode == 0
    before = _snapshot(work)
    r = train(cfg, "--work-dir", work, env=env)
    _one_line(
        r,
        2,
        r"--work-dir .*w holds checkpoints of an earlier run \(step_2, step_4\); continue it with "
        r"--resume auto, use a new --work-dir, or pass --overwrite",
    )
    assert _snapshot(work) == before  # nothing deleted, nothing written
    r = train(cfg, "--work-dir", work, "--resume", "auto", "--overwrite", env=env)
    _one_line(r, 2, r"--overwrite and --resume contradict each other")
    r = train(cfg, "--work-dir", work, "--overwrite", "--cfg-options", "max_iters=2", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--overwrite: deleted the earlier run's checkpoints, metrics.jsonl, hf" in r.stderr
    assert checkpoints(work)["complete"] == ["step_2"] and checkpoints(work)["latest"] == "step_2"
    assert [m["step"] for m in metrics(work) if "step" in m] == [1, 2]  # the new run's records only


def test_a_run_that_wrote_no_checkpoint_leaves_no_metrics_to_mix_in(tiny_model, tiny_data, tmp_path):
    cfg = _cfg(tmp_path, tiny_model, tiny_data, max_iters=3, save_steps=1000)
    work = tmp_path / "w"
    work.mkdir()
    (work / "metrics.jsonl").write_text(json.dumps({"step": 7, "loss": 1.0}) + "\n")
    r = train(cfg, "--work-dir", work, env=clean_env(TOKENTRAIN_CACHE=str(tmp_path / "cache")))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["step"] for m in metrics(work) if "step" in m] == [1, 2, 3]


def test_pruning_never_deletes_the_checkpoint_just_written(tiny_model, tiny_data, tmp_path):
    """Resumed from an early step of a longer run: the old run's higher steps go first, the new
    run's checkpoints stay, and `latest` always names a complete folder."""
    work = tmp_path / "w"
    env = clean_env(TOKENTRAIN_CACHE=str(tmp_path / "cache"))
    cfg = _cfg(tmp_path, tiny_model, tiny_data, max_iters=10, save_total_limit=-1)
    assert train(cfg, "--work-dir", work, env=env).returncode == 0
    assert checkpoints(work)["complete"] == [f"step_{s}" for s in (2, 4, 6, 8, 10)]
    old = {s: (work / "checkpoints" / f"step_{s}" / "COMPLETE").stat().st_mtime_ns for s in (2, 4, 6, 8, 10)}
    cfg = _cfg(tmp_path, tiny_model, tiny_data, max_iters=6, save_total_limit=2)
    r = train(cfg, "--work-dir", work, "--resume", work / "checkpoints" / "step_2", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    c = checkpoints(work)
    assert c["complete"] == ["step_4", "step_6"] and c["latest"] == "step_6", c
    for s in (4, 6):  # both written by the new run
        assert (work / "checkpoints" / f"step_{s}" / "COMPLETE").stat().st_mtime_ns > old[10]
    assert not list((work / "checkpoints").glob(".*"))  # no partial or replaced folder left


def test_work_dir_that_is_a_file_is_a_usage_error(tiny_model, tiny_data, tmp_path):
    cfg = _cfg(tmp_path, tiny_model, tiny_data)
    (tmp_path / "f").write_text("x")
    r = train(cfg, "--work-dir", tmp_path / "f", env=clean_env(TOKENTRAIN_CACHE=str(tmp_path / "cache")))
    _one_line(r, 2, r"--work-dir .*f: is a file, not a folder")


def test_outputs_get_the_umask_permissions(tiny_model, tiny_data, tmp_path):
    cfg = _cfg(tmp_path, tiny_model, tiny_data, max_iters=2)
    work = tmp_path / "w"
    env = clean_env(TOKENTRAIN_CACHE=str(tmp_path / "cache"))
    r = subprocess.run(
        ["sh", "-c", 'umask 022 && exec "$@"', "sh", *TT, "train", str(cfg), "--work-dir", str(work)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = work / "checkpoints"
    for p in [
        work / "hf",
        *(work / "hf").iterdir(),
        ckpt / "latest",
        *(ckpt / "step_2").iterdir(),
        work / "metrics.jsonl",
    ]:
        mode = os.stat(p).st_mode & 0o777
        assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))
