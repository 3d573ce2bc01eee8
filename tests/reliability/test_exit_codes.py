"""The documented exit codes through the real CLI, alone and under the launchers that must
pass them through: `NPROC_PER_NODE=2 tokentrain train` (tokentrain starts torchrun and
returns the ranks' own code), torchrun itself, and srun.

    0 done, 1 failure (here: a NaN loss), 2 config error, 3 data error, 75 preempted

torchrun reports any failed worker as 1 (its own rule; the ranks' codes are in its log), so
under a bare torchrun 2, 3 and 75 read as 1 -- which is why NPROC_PER_NODE exists. srun
returns the highest task exit code."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tokentrain.distributed.spawn import _free_port

from .helpers import BIN, TT, checkpoints, clean_env, error_lines, metrics, torchrun_cmd, wait_for, write_cfg

pytestmark = pytest.mark.distributed  # starts several processes

CODES = {"ok": 0, "nan": 1, "config": 2, "data": 3, "preempted": 75}


def _args(case: str, tiny_model, tiny_data, tmp_path: Path) -> tuple[list[str], str | None]:
    """(train arguments, fault spec) that end a run with the case's code."""
    over = dict(batch_size=1, max_iters=4, save_steps=1000)
    faults = None
    if case == "config":
        over["batch_size"] = 0
    elif case == "data":
        over["dataset_folder"] = str(tmp_path / "missing")
    elif case == "nan":
        faults = "nan_loss_at_step=2"
    elif case == "preempted":
        over.update(max_iters=100000, save_steps=100000)
    cfg = write_cfg(tmp_path / "run.py", tiny_model, tiny_data, **over)
    return [str(cfg), "--work-dir", str(tmp_path / "w")], faults


def _run(cmd: list[str], env: dict, case: str, work: Path, timeout: int = 240, sig=signal.SIGTERM) -> tuple[int, str]:
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        if case == "preempted":
            wait_for(lambda: len(metrics(work)) >= 2, proc, timeout=180, poll=0.05)
            os.kill(proc.pid, sig)  # as a scheduler would: to the launcher's process
        err = proc.communicate(timeout=timeout)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err


def _check(
    case: str, rc: int, err: str, work: Path, expected: int, traceback_ok: bool = False, sig: str = "SIGTERM"
) -> None:
    assert rc == expected, (case, rc, err[-3000:])
    if case == "preempted":
        assert checkpoints(work)["latest"] is not None and f"stopped by {sig}" in err, err[-3000:]
    elif case == "ok":
        assert (work / "hf" / "model.safetensors").is_file()
    else:
        lines = [x for x in error_lines(err) if "error" in x]
        assert lines, err[-3000:]
        assert traceback_ok or "Traceback" not in err, err[-3000:]  # a bare torchrun prints its own


@pytest.mark.parametrize("case", list(CODES))
def test_exit_code_of_the_plain_cli(case, tiny_model, tiny_data, tmp_path):
    args, faults = _args(case, tiny_model, tiny_data, tmp_path)
    rc, err = _run(
        [*TT, "train", *args], clean_env(faults, TOKENTRAIN_CACHE=str(tmp_path / "cache")), case, tmp_path / "w"
    )
    _check(case, rc, err, tmp_path / "w", CODES[case])


@pytest.mark.parametrize("case", ["data", "preempted"])
def test_a_sigterm_while_the_process_ends_keeps_its_code(case, tiny_model, tiny_data, tmp_path):
    """srun --kill-on-bad-exit (and torchrun) SIGTERM the other ranks once the first one exits;
    one that has its code already and is ending must keep it (3, 75), not die as 143. Here the
    fault `exit_sleep` holds the process after its code is recorded, and the SIGTERM lands then."""
    args, faults = _args(case, tiny_model, tiny_data, tmp_path)
    codes = tmp_path / "codes"
    codes.mkdir()
    env = clean_env(
        ",".join(x for x in (faults, "exit_sleep=3") if x),
        TOKENTRAIN_CACHE=str(tmp_path / "cache"),
        TOKENTRAIN_EXIT_DIR=str(codes),
    )
    proc = subprocess.Popen([BIN, "train", *args], env=env, stderr=subprocess.PIPE, text=True)
    try:
        if case == "preempted":
            wait_for(lambda: len(metrics(tmp_path / "w")) >= 2, proc, timeout=180, poll=0.05)
            proc.send_signal(signal.SIGTERM)
        wait_for((codes / "rank0.code").exists, proc, timeout=180, poll=0.05)
        proc.send_signal(signal.SIGTERM)  # the code is recorded; the process is still ending
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (codes / "rank0.code").read_text() == str(CODES[case])
    _check(case, proc.returncode, err, tmp_path / "w", CODES[case])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["nan", "config", "data", "preempted"])
def test_exit_code_through_nproc_per_node(case, tiny_model, tiny_data, tmp_path):
    """tokentrain starts torchrun and returns the ranks' own code (not torchrun's 1)."""
    args, faults = _args(case, tiny_model, tiny_data, tmp_path)
    env = clean_env(faults, TOKENTRAIN_CACHE=str(tmp_path / "cache"), NPROC_PER_NODE="2", PORT=str(_free_port()))
    rc, err = _run([*TT, "train", *args], env, case, tmp_path / "w")
    _check(case, rc, err, tmp_path / "w", CODES[case])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["nan", "data", "preempted"])
def test_exit_code_through_torchrun(case, tiny_model, tiny_data, tmp_path):
    """A bare torchrun says 1 for any failed worker, whatever its code; 0 stays 0."""
    args, faults = _args(case, tiny_model, tiny_data, tmp_path)
    cmd = torchrun_cmd(*args)
    rc, err = _run(cmd, clean_env(faults, TOKENTRAIN_CACHE=str(tmp_path / "cache")), case, tmp_path / "w")
    print(f"torchrun, {case}: exit {rc}")
    _check(case, rc, err, tmp_path / "w", TORCHRUN_CODES[case], traceback_ok=True)


TORCHRUN_CODES = {"nan": 1, "data": 1, "preempted": 1}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["nan", "data", "preempted"])
def test_exit_code_through_srun(case, tiny_model, tiny_data, tmp_path, request):
    request.getfixturevalue("slurm_cluster")
    args, faults = _args(case, tiny_model, tiny_data, tmp_path)
    cmd = ["srun", "-N1", "-n2", "--kill-on-bad-exit=1", BIN, "train", *args, "--launcher", "slurm"]
    # srun passes SIGUSR1 on to the tasks (as `srun --signal=USR1@T` or `scancel --signal=USR1` do);
    # a SIGTERM to srun itself makes it kill the step (exit 137), so preemption goes by SIGUSR1.
    rc, err = _run(
        cmd,
        clean_env(faults, TOKENTRAIN_CACHE=str(tmp_path / "cache"), MASTER_PORT=str(_free_port())),
        case,
        tmp_path / "w",
        sig=signal.SIGUSR1,
    )
    print(f"srun, {case}: exit {rc}")
    _check(case, rc, err, tmp_path / "w", SRUN_CODES[case], sig="SIGUSR1")


SRUN_CODES = {"nan": 1, "data": 3, "preempted": 75}
