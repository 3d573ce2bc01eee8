"""Signals and the datasets' checks before step 1, through the real `tokentrain train`
(docs/reliability.md, "Signals" and "Bad input"): Ctrl-C stops like SIGTERM (checkpoint,
exit 75), a second Ctrl-C aborts at once (130), a signal during start-up ends in its
documented code without a traceback; a set with no target, validation ids outside the
vocabulary or a validation set smaller than one pack are one-line data errors naming the
set before any step; an evaluation failure never loses the step's checkpoint."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import pytest

from tests.data.helpers import write_bin

from .helpers import TT, checkpoints, clean_env, error_lines, metrics, train, wait_for, write_cfg


def _popen(cfg, work, tmp_path, faults=None, *extra):
    env = clean_env(faults, TOKENTRAIN_CACHE=str(tmp_path / "cache"))
    cmd = [*TT, "train", str(cfg), "--work-dir", str(work), "--resume", "auto", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _write_set(folder, docs):
    folder.mkdir(parents=True)
    (folder / "part-000.bin").write_text("".join(json.dumps({"tokens": d}) + "\n" for d in docs))
    return folder


def test_ctrl_c_checkpoints_at_the_step_and_exits_75(tiny_model, tiny_data, tmp_path):
    cfg = write_cfg(tmp_path / "run.py", tiny_model, tiny_data, max_iters=100000, save_steps=100000)
    work = tmp_path / "w"
    proc = _popen(cfg, work, tmp_path)
    wait_for(lambda: len(metrics(work)) >= 3, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "Traceback" not in err and not error_lines(err), err[-3000:]
    step = max(m["step"] for m in metrics(work) if "step" in m)
    assert checkpoints(work)["latest"] == f"step_{step}"
    assert re.search(rf"stopped by SIGINT after step {step}; checkpoint written, resume with --resume auto", err)


def test_a_second_ctrl_c_aborts_at_once_without_a_traceback(tiny_model, tiny_data, tmp_path):
    cfg = write_cfg(tmp_path / "run.py", tiny_model, tiny_data, max_iters=100000, save_steps=100000)
    work = tmp_path / "w"
    proc = _popen(cfg, work, tmp_path, "save_sleep=60")
    wait_for(lambda: len(metrics(work)) >= 2, proc)
    proc.send_signal(signal.SIGINT)  # stop after this step: the checkpoint writer then sleeps 60 s
    wait_for(lambda: list((work / "checkpoints").glob(".step_*.partial")), proc)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=50)
    assert proc.returncode == 130 and time.time() - t0 < 30, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert error_lines(err) == [
        "tokentrain: interrupted; nothing was saved since the last checkpoint (if any): continue with --resume auto"
    ]
    assert checkpoints(work)["latest"] is None and not checkpoints(work)["complete"]  # the partial one is never used


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("delay", [0.6, 1.5, 3.0, 5.0])
def test_a_signal_during_start_up_gives_the_documented_code(sig, delay, tiny_model, tiny_data, tmp_path):
    """Before the trainer's setup: 130 (SIGINT) or 75 (SIGTERM) at once; from setup on, both
    stop after the first step with a checkpoint, 75. Never a traceback, one line at most."""
    cfg = write_cfg(tmp_path / "run.py", tiny_model, tiny_data, max_iters=100000, save_steps=100000)
    work = tmp_path / "w"
    proc = _popen(cfg, work, tmp_path)
    time.sleep(delay)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    allowed = (75, 130) if sig == signal.SIGINT else (75,)
    assert proc.returncode in allowed, (proc.returncode, err[-3000:])
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert len(error_lines(err)) <= 1, err[-3000:]
    c = checkpoints(work)
    if c["complete"]:  # stopped after a step: that step's checkpoint is the latest
        assert proc.returncode == 75 and c["latest"] == c["complete"][-1]


def test_a_training_set_without_a_target_token_is_a_data_error(tiny_model, tmp_path):
    data = _write_set(tmp_path / "neg", [[-(1 + (i * 7 + j) % 500) for j in range(60)] for i in range(20)])
    cfg = write_cfg(tmp_path / "run.py", tiny_model, data, max_length=32, max_iters=4)
    r = train(cfg, "--work-dir", tmp_path / "w", env=clean_env(TOKENTRAIN_CACHE=str(tmp_path / "cache")))
    _data_error(r, tmp_path / "w", rf"dataset_folder = '{data}': no target token in any of its \d+ sample")


@pytest.mark.parametrize(
    "case,docs,pattern",
    [
        (
            "id >= vocabulary",
            [[5] * 40, [7, 9000, 3] + [4] * 30],
            r"val_dataset_folder = '.*': token id 9000 >= the model's vocabulary size 512 \(validation sample \d+: "
            r".*part-000\.bin:2\)",
        ),
        ("smaller than one pack", [[5, 6, 7]], r"val_dataset_folder = '.*': the dataset has 3 tokens, fewer than one"),
        ("no target token", [[-5] * 80], r"val_dataset_folder = '.*': no target token in any of its 2 sample"),
    ],
)
def test_a_bad_validation_set_is_a_data_error_before_the_first_step(
    case, docs, pattern, tiny_model, tiny_data, tmp_path
):
    # with a meta written by hand (no summary): checked once the model is built, not from summaries at start
    val = tmp_path / "val"
    write_bin(val / "part-000.bin", docs)
    cfg = write_cfg(tmp_path / "run.py", tiny_model, tiny_data, max_iters=4, max_length=32, val_dataset_folder=str(val))
    r = train(cfg, "--work-dir", tmp_path / "w", env=clean_env(TOKENTRAIN_CACHE=str(tmp_path / "cache")))
    _data_error(r, tmp_path / "w", pattern)


def _data_error(r, work, pattern):
    lines = error_lines(r.stderr)
    assert r.returncode == 3, r.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr[-3000:]
    assert re.search(pattern, lines[0]), lines[0]
    assert not metrics(work) and not checkpoints(work)["complete"]  # found before the first step


def test_an_evaluation_failure_keeps_the_steps_checkpoint(tiny_model, tiny_data, tmp_path):
    """The validation file is rewritten under the run: evaluation at step 4 fails (exit 3), and
    step 4's checkpoint, written before evaluating, is the latest."""
    val = _write_set(tmp_path / "val", [[5 + i % 50] * 40 for i in range(8)])
    cfg = write_cfg(
        tmp_path / "run.py",
        tiny_model,
        tiny_data,
        max_iters=8,
        save_steps=4,
        evaluation_freq=4,
        val_dataset_folder=str(val),
        max_length=32,
    )
    work = tmp_path / "w"
    proc = _popen(cfg, work, tmp_path, "save_sleep=2")
    wait_for(lambda: len(metrics(work)) >= 1, proc)  # past the checks before step 1
    f = val / "part-000.bin"
    f.write_bytes(b"\n" * 7 + f.read_bytes()[7:])  # same size, lines moved: not where the meta says
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-3000:]
    assert len(error_lines(err)) == 1 and "part-000.bin" in error_lines(err)[0], err[-3000:]
    assert checkpoints(work)["latest"] == "step_4" and checkpoints(work)["complete"] == ["step_4"]
