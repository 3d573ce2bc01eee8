"""Faults around checkpoints, through the real `tokentrain train`: kill -9 at seeded random
points (also mid-write), SIGUSR1, no space left, truncated and corrupted checkpoint files.
Every run is compared with one uninterrupted run: the losses and the final parameters are
bit-identical, and a half-written or damaged checkpoint is never resumed from."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .helpers import (
    TT,
    checkpoints,
    clean_env,
    error_lines,
    losses,
    metrics,
    same_weights,
    train,
    wait_for,
    weights,
    write_cfg,
    written_since,
)

STEPS = 12


@pytest.fixture(scope="module")
def ref(tiny_model, tiny_data, tmp_path_factory):
    """One uninterrupted run: 12 steps, a checkpoint every 2."""
    root = tmp_path_factory.mktemp("reference")
    cfg = write_cfg(root / "run.py", tiny_model, tiny_data)
    env = clean_env(TOKENTRAIN_CACHE=str(root / "cache"))
    r = train(cfg, "--work-dir", root / "w", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["step"] for m in metrics(root / "w")] == list(range(1, STEPS + 1))
    return dict(cfg=cfg, work=root / "w", cache=str(root / "cache"))


def assert_matches_reference(work: Path, ref: dict) -> None:
    assert [m["step"] for m in metrics(work)] == list(range(1, STEPS + 1))
    assert losses(work) == losses(ref["work"])  # the whole loss sequence, exactly
    assert same_weights(weights(work / "hf" / "model.safetensors"), weights(ref["work"] / "hf" / "model.safetensors"))
    last = f"checkpoints/step_{STEPS}/model.safetensors"
    assert same_weights(weights(work / last), weights(ref["work"] / last))


def assert_nothing_half_is_trusted(work: Path) -> dict:
    """`latest` names a complete checkpoint; no step_N folder lacks its COMPLETE marker."""
    c = checkpoints(work)
    assert not c["incomplete"], c
    assert c["latest"] is None or c["latest"] in c["complete"], c
    return c


class StderrTail:
    """A child's stderr, read as it comes (to act on a line of this very run)."""

    def __init__(self, proc: subprocess.Popen):
        import threading

        self.chunks: list[str] = []
        self.thread = threading.Thread(target=lambda: [self.chunks.append(x) for x in proc.stderr], daemon=True)
        self.thread.start()

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    def join(self) -> str:
        self.thread.join(timeout=30)
        return self.text


def resumed_from(stderr: str) -> int | None:
    for line in stderr.splitlines():
        if "resumed from " in line:
            return int(line.split(" at step ")[1].split()[0])
    return None


# --------------------------------------------------------------------------- kill -9


@pytest.mark.slow
def test_kill_9_at_seeded_random_points_then_resume_auto_is_bit_identical(ref, tmp_path):
    """Six kill -9s of the training process -- at random steps, during checkpoint writes
    (while `.step_N.partial` is being filled) and at random moments of start-up -- each
    followed by `--resume auto`, then a run to the end: the same losses and parameters as
    the uninterrupted run, and a half-written checkpoint is never `latest`."""
    rng = random.Random(20240611)
    work = tmp_path / "w"
    # save_sleep: each checkpoint write pauses 0.3 s after the weights are written (and before
    # COMPLETE), so a kill "during the write" lands there deterministically.
    env = clean_env(faults="save_sleep=0.3", TOKENTRAIN_CACHE=ref["cache"])
    kinds = ["in_save", "after_step", "in_save", "after_step", "startup", "in_save"]
    rng.shuffle(kinds)
    log = []
    for kind in kinds:
        done = max((m["step"] for m in metrics(work)), default=0)
        c = assert_nothing_half_is_trusted(work)
        start_step = int(c["latest"][5:]) if c["latest"] else 0
        assert done == start_step or not c["latest"] or done >= start_step
        launched = time.time()
        proc = subprocess.Popen(
            [*TT, "train", str(ref["cfg"]), "--work-dir", str(work), "--resume", "auto"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        out = StderrTail(proc)
        if kind == "startup":
            delay = rng.uniform(0.5, 4.0)
            time.sleep(delay)
            where = f"{delay:.2f}s after start"
        elif kind == "after_step":
            target = rng.randint(start_step + 1, STEPS - 1)
            wait_for(lambda: f"step {target}/{STEPS} " in out.text, proc, poll=0.002)  # noqa: B023 (called here)
            where = f"after step {target} was logged"
        else:
            save = rng.choice(range(start_step + 2, STEPS + 1, 2))
            model = work / "checkpoints" / f".step_{save}.partial" / "model.safetensors"
            # This run's write, not a partial folder an earlier kill left behind (the run removes
            # that folder first: the check must not trip over the file vanishing under it).
            wait_for(lambda: written_since(model, launched), proc, poll=0.002)  # noqa: B023
            where = f"while writing step_{save}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        err = out.join()
        assert proc.returncode == -signal.SIGKILL
        got = resumed_from(err)
        if kind != "startup":  # killed once training ran: it had resumed from the newest complete one
            assert got == (start_step if start_step else None), (got, start_step, err[-2000:])
        after = assert_nothing_half_is_trusted(work)
        if kind == "in_save":
            assert f"step_{save}" not in after["complete"] and after["latest"] != f"step_{save}"
            assert f".step_{save}.partial" in after["partial"]  # left behind, never used
        log.append((kind, where, after["latest"]))
    assert {k for k, _, _ in log} == {"in_save", "after_step", "startup"}
    final = subprocess.run(
        [*TT, "train", str(ref["cfg"]), "--work-dir", str(work), "--resume", "auto"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert final.returncode == 0, final.stderr[-3000:]
    assert_matches_reference(work, ref)
    assert not checkpoints(work)["partial"] or all(
        int(p.split("_")[1].split(".")[0]) <= STEPS for p in checkpoints(work)["partial"]
    )
    print("kills:", log)


# --------------------------------------------------------------------------- SIGUSR1


def test_sigusr1_checkpoints_at_the_step_boundary_exits_75_and_resumes_exactly(ref, tmp_path):
    work = tmp_path / "w"
    env = clean_env(faults="save_sleep=0.2", TOKENTRAIN_CACHE=ref["cache"])  # slow enough to signal mid-run
    proc = subprocess.Popen(
        [*TT, "train", str(ref["cfg"]), "--work-dir", str(work)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: len(metrics(work)) >= 3, proc, poll=0.002)
    proc.send_signal(signal.SIGUSR1)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 75, err[-2000:]
    stopped = int(checkpoints(work)["latest"][5:])
    assert 3 <= stopped < STEPS and f"stopped by SIGUSR1 after step {stopped}" in err
    assert max(m["step"] for m in metrics(work)) == stopped  # the checkpoint is at the step boundary it logged
    r = train(ref["cfg"], "--work-dir", work, "--resume", "auto", env=env)
    assert r.returncode == 0 and resumed_from(r.stderr) == stopped, r.stderr[-2000:]
    assert_matches_reference(work, ref)


# --------------------------------------------------------------------------- no space left


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


@pytest.mark.parametrize("how", ["small_filesystem", "injected"])
def test_no_space_left_while_writing_a_checkpoint(ref, tmp_path, how):
    """The step_4 write fails: a one-line error naming the folder and the cause, exit 1,
    the partial folder gone, `latest` still step_2 and resumable to the exact result."""
    work = tmp_path / "w"
    ckpt = work / "checkpoints"
    mounted = False
    if how == "small_filesystem":
        # One checkpoint is ~0.8 MB: 1.2 MB holds step_2 and fails inside step_4.
        mounted = _mount_tmpfs(ckpt, "1200k")
        if not mounted:
            pytest.skip("cannot mount a tmpfs here (needs root); the injected variant covers the same path")
        env = clean_env(TOKENTRAIN_CACHE=ref["cache"])
    else:
        env = clean_env(faults="save_enospc_at_step=4", TOKENTRAIN_CACHE=ref["cache"])
    try:
        r = train(ref["cfg"], "--work-dir", work, env=env)
        assert r.returncode == 1, r.stderr[-3000:]
        lines = error_lines(r.stderr)
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert f"cannot write checkpoint {ckpt / '.step_4.partial'}: no space left on device" in lines[0], lines[0]
        assert f"the previous checkpoint {ckpt / 'step_2'} is intact" in lines[0]
        c = checkpoints(work)
        assert c == {"latest": "step_2", "complete": ["step_2"], "incomplete": [], "partial": []}, c
        if mounted:  # free space: grow the file system
            subprocess.run(["mount", "-o", "remount,size=64m", str(ckpt)], check=True)
        r = train(ref["cfg"], "--work-dir", work, "--resume", "auto", env=clean_env(TOKENTRAIN_CACHE=ref["cache"]))
        assert r.returncode == 0 and resumed_from(r.stderr) == 2, r.stderr[-3000:]
        assert_matches_reference(work, ref)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(ckpt)], capture_output=True)


# --------------------------------------------------------------------------- damaged checkpoints


def _copy_work(ref: dict, dst: Path) -> Path:
    import shutil

    shutil.copytree(ref["work"], dst)
    for p in (dst / "hf",):
        shutil.rmtree(p)
    return dst


def test_truncated_or_corrupted_checkpoint_is_refused_and_auto_falls_back(ref, tmp_path):
    work = _copy_work(ref, tmp_path / "w")
    ckpt = work / "checkpoints"
    opt = ckpt / "step_12" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])  # truncated
    model = ckpt / "step_10" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x40  # one flipped bit, same size
    model.write_bytes(bytes(data))
    env = clean_env(TOKENTRAIN_CACHE=ref["cache"])

    # An explicit damaged checkpoint is refused, naming the file.
    for folder, name, why in ((ckpt / "step_12", opt, "truncated"), (ckpt / "step_10", model, "corrupted")):
        r = train(ref["cfg"], "--work-dir", tmp_path / "other", "--resume", folder, env=env)
        lines = error_lines(r.stderr)
        assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert f"checkpoint is damaged: {name}" in lines[0] and why in lines[0], lines[0]
        assert not (tmp_path / "other" / "checkpoints").exists()

    # --resume auto skips both, says so, and continues from step_8 to the exact result.
    r = train(ref["cfg"], "--work-dir", work, "--resume", "auto", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"checkpoint {ckpt / 'step_12'} is damaged and is not used: {opt}" in r.stderr
    assert f"checkpoint {ckpt / 'step_10'} is damaged and is not used: {model}" in r.stderr
    assert "falling back to step_8" in r.stderr and resumed_from(r.stderr) == 8
    assert_matches_reference(work, ref)
