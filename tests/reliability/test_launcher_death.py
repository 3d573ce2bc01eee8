"""No rank outlives its launcher (docs/reliability.md, "When the launcher dies"): SIGKILL the
`tokentrain` process that started torchrun, or a bare torchrun, and every rank and data-loader
worker is gone within seconds -- after a checkpoint when the ranks can still write one, else
after `TOKENTRAIN_ORPHAN_GRACE`. torchrun puts each rank in a session of its own, so nothing
but the ranks themselves can end them. And NPROC_PER_NODE is checked before anything starts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tokentrain.distributed.spawn import _free_port

from .helpers import TT, checkpoints, clean_env, error_lines, metrics, torchrun_cmd, train, wait_for, write_cfg

pytestmark = pytest.mark.distributed  # starts several processes


def _processes_of(work: Path) -> set[int]:
    """Live processes whose command line names the work dir: launcher, torchrun, ranks, and the
    ranks' forked data-loader workers (the same command line)."""
    found = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes()  # empty for a zombie
        except OSError:
            continue
        if str(work).encode() in cmdline:
            found.add(int(d.name))
    return found


def _start(cmd: list[str], env: dict, work: Path) -> tuple[subprocess.Popen, set[int]]:
    """Start the job (stderr to `work`'s sibling file: the ranks may hold it after the launcher
    is gone), wait for its second step, return it and its processes then."""
    with open(work.with_name("stderr.txt"), "wb") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        wait_for(lambda: len(metrics(work)) >= 2, proc, timeout=240, poll=0.1)
    except BaseException:
        _kill_all(proc, work)
        raise
    return proc, _processes_of(work)


def _kill_all(proc: subprocess.Popen, work: Path) -> None:
    for pid in {proc.pid, *_processes_of(work)}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _orphans_after_killing(proc: subprocess.Popen, work: Path, within: float) -> tuple[set[int], float, str]:
    """SIGKILL the launcher; (processes of the job left after `within` seconds, seconds until
    none was left, the job's stderr)."""
    os.kill(proc.pid, signal.SIGKILL)
    t0 = time.time()
    proc.wait()
    left = _processes_of(work)
    while left and time.time() - t0 < within:
        time.sleep(0.2)
        left = _processes_of(work)
    took = time.time() - t0
    if left:
        _kill_all(proc, work)
    return left, took, work.with_name("stderr.txt").read_text(errors="replace")


def _job(tiny_model, tiny_data, tmp_path: Path, **over) -> tuple[list[str], Path]:
    cfg = write_cfg(
        tmp_path / "run.py",
        tiny_model,
        tiny_data,
        **dict(dict(batch_size=1, max_iters=100000, save_steps=100000, dataloader_num_workers=1), **over),
    )
    work = tmp_path / "w"
    return [str(cfg), "--work-dir", str(work)], work


def test_killing_the_tokentrain_launcher_ends_every_rank(tiny_model, tiny_data, tmp_path):
    """`NPROC_PER_NODE=2 tokentrain train`, SIGKILL to `tokentrain`: torchrun gets SIGTERM and
    stops its ranks as if preempted (a checkpoint at the step), then nothing of the job is left."""
    args, work = _job(tiny_model, tiny_data, tmp_path)
    env = clean_env(None, TOKENTRAIN_CACHE=str(tmp_path / "cache"), NPROC_PER_NODE="2", PORT=str(_free_port()))
    proc, running = _start([*TT, "train", *args], env, work)
    assert len(running) >= 1 + 1 + 2 + 2, running  # tokentrain, torchrun, 2 ranks, a worker each
    left, took, err = _orphans_after_killing(proc, work, within=45)
    print(f"{len(running)} processes; all gone {took:.1f} s after the SIGKILL")
    assert not left, (left, err[-3000:])
    assert checkpoints(work)["latest"] is not None, err[-3000:]  # they stopped as if preempted


def test_killing_torchrun_stops_its_ranks_as_if_preempted(tiny_model, tiny_data, tmp_path):
    """A bare torchrun, SIGKILLed: its ranks get SIGTERM from the kernel, finish the step, write
    a checkpoint and exit, their data-loader workers with them."""
    args, work = _job(tiny_model, tiny_data, tmp_path)
    proc, running = _start(torchrun_cmd(*args), clean_env(None, TOKENTRAIN_CACHE=str(tmp_path / "cache")), work)
    assert len(running) >= 1 + 2 + 2, running  # torchrun, 2 ranks, a worker each
    left, took, err = _orphans_after_killing(proc, work, within=45)
    print(f"{len(running)} processes; all gone {took:.1f} s after the SIGKILL")
    assert not left, (left, err[-3000:])
    assert checkpoints(work)["latest"] is not None, err[-3000:]
    assert re.search(r"stopped by SIGTERM after step \d+; checkpoint written", err), err[-3000:]


def test_killing_torchrun_ends_every_rank_even_one_stuck_in_a_checkpoint(tiny_model, tiny_data, tmp_path):
    """The same, with the checkpoint made to hang (`save_sleep`, as a collective with a dead
    peer would): the grace period ends the ranks anyway, and their workers with them."""
    args, work = _job(tiny_model, tiny_data, tmp_path)
    env = clean_env("save_sleep=600", TOKENTRAIN_CACHE=str(tmp_path / "cache"), TOKENTRAIN_ORPHAN_GRACE="5")
    proc, running = _start(torchrun_cmd(*args), env, work)
    assert len(running) >= 1 + 2 + 2, running  # torchrun, 2 ranks, a worker each
    left, took, err = _orphans_after_killing(proc, work, within=30)
    print(f"{len(running)} processes; all gone {took:.1f} s after the SIGKILL")
    assert not left, (left, err[-3000:])
    assert took >= 5, err[-3000:]  # the grace period, not the checkpoint, ended them
    assert "still running 5 s after its launcher died; ending it now" in err, err[-3000:]
    assert not checkpoints(work)["complete"], err[-3000:]


def test_torchrun_is_not_started_for_a_launcher_already_gone():
    """The wrapper `tokentrain` starts torchrun through, when the pid it is tied to is no longer
    its parent (it died before the child could ask for the signal)."""
    r = subprocess.run(
        [sys.executable, "-m", "tokentrain.run.parent_watch", "1", "json.tool", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and not r.stdout, r
    assert r.stderr == "tokentrain: the process that started json.tool (pid 1) is gone; not starting it\n"
    ok = subprocess.run(
        [sys.executable, "-c", _TIED_TO_ME, "json.tool", "--help"], capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0 and "json.tool" in ok.stdout, ok


_TIED_TO_ME = """
import subprocess, sys
from tokentrain.run.parent_watch import tied_to_this_process
sys.exit(subprocess.run(tied_to_this_process([sys.executable, "-m", *sys.argv[1:]])).returncode)
"""


@pytest.mark.parametrize("value", ["0", "-1", "abc", "", "1.5"])
def test_an_invalid_nproc_per_node_is_one_line(value, tiny_model, tiny_data, tmp_path):
    args, work = _job(tiny_model, tiny_data, tmp_path)
    r = train(*args, env=clean_env(None, TOKENTRAIN_CACHE=str(tmp_path / "cache"), NPROC_PER_NODE=value), timeout=60)
    assert r.returncode == 2, r.stderr[-3000:]
    assert error_lines(r.stderr) == [
        f"tokentrain: error: NPROC_PER_NODE={value!r}: must be a whole number of ranks per node, 1 or more "
        "(e.g. NPROC_PER_NODE=2); unset it to train in one process"
    ], r.stderr[-3000:]
    assert "Traceback" not in r.stderr and not work.exists()


def test_an_invalid_orphan_grace_is_one_line(tiny_model, tiny_data, tmp_path):
    args, work = _job(tiny_model, tiny_data, tmp_path)
    env = clean_env(None, TOKENTRAIN_CACHE=str(tmp_path / "cache"), NPROC_PER_NODE="2", TOKENTRAIN_ORPHAN_GRACE="0")
    r = train(*args, env=env, timeout=60)
    assert r.returncode == 2, r.stderr[-3000:]
    assert [x.split(":")[2] for x in error_lines(r.stderr)] == [" TOKENTRAIN_ORPHAN_GRACE='0'"], r.stderr[-3000:]
    assert not work.exists()


def test_many_more_ranks_than_cores_on_cpu_is_a_warning(tiny_model, tiny_data, tmp_path):
    """The warning comes before torchrun starts; the config error after it shows that nothing
    else was started (a valid run of 64 ranks would take minutes here)."""
    args, _ = _job(tiny_model, tiny_data, tmp_path, batch_size=0)
    cores = len(os.sched_getaffinity(0))
    r = train(*args, env=clean_env(None, TOKENTRAIN_CACHE=str(tmp_path / "cache"), NPROC_PER_NODE="64"), timeout=60)
    assert r.returncode == 2, r.stderr[-3000:]
    warned = re.search(
        rf"^\[tokentrain\] .*NPROC_PER_NODE=64 ranks on {cores} CPU core\(s\) and no GPU: each rank gets .* of a core, "
        rf"slower than {cores} rank\(s\) would be; use NPROC_PER_NODE={cores} or fewer$",
        r.stderr,
        re.M,
    )
    assert warned and r.stderr.index(warned[0]) < r.stderr.index("batch_size"), r.stderr[-3000:]
