"""Faults inside training, through the real `tokentrain train`: NaN/inf loss and gradients
(stop by default, naming the step and the batch's samples; skip with nan_policy='skip'),
training data rewritten under a running job, a token id beyond the vocabulary, and one of
two ranks killed under DeepSpeed."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.data.helpers import write_bin

from .helpers import TT, checkpoints, clean_env, error_lines, metrics, torchrun_cmd, train, wait_for, write_cfg

# bf16 compute parameters, fp32 masters: the gradients live in the masters' fp32 buffer.
PARAMS_MODE = dict(dtype="bfloat16", mixed_precision="params")


def _sources_of_step(cfg_data: Path, step: int, batch_size: int = 2, seed: int = 3) -> list[tuple[str, int]]:
    """(file, line) of every document of the samples one-process training takes at `step`."""
    from tokentrain.data.dataset import DataSettings, build_dataset
    from tokentrain.data.sampler import ResumableSampler

    ds = build_dataset(DataSettings(folder=str(cfg_data), max_length=128, seed=seed))
    order = ResumableSampler(len(ds), 0, 1, seed=seed).order(0)
    ks = order[(step - 1) * batch_size : step * batch_size]
    return [(k, ds.sources(int(k))) for k in ks]


@pytest.mark.parametrize(
    "fault,workers,precision",
    [("nan_loss_at_step", 2, {}), ("inf_grad_at_step", 0, {}), ("inf_grad_at_step", 0, PARAMS_MODE)],
    ids=["nan-loss", "inf-grad", "inf-grad-fp32-masters"],
)
def test_non_finite_stops_by_default_naming_step_and_samples(
    tiny_model, tiny_data, tmp_path, fault, workers, precision
):
    """(With DataLoader workers too: they ignore SIGTERM, and once made the exit hang. In
    mixed_precision = 'params' the gradient that goes inf is an fp32 master's.)"""
    cfg = write_cfg(tmp_path / "run.py", tiny_model, tiny_data, dataloader_num_workers=workers, **precision)
    work = tmp_path / "w"
    r = train(
        cfg, "--work-dir", work, env=clean_env(faults=f"{fault}=5", TOKENTRAIN_CACHE=os.environ["TOKENTRAIN_CACHE"])
    )
    lines = error_lines(r.stderr)
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    what = "loss nan" if fault == "nan_loss_at_step" else "gradient norm inf"
    assert f"non-finite {what} at step 5; batch of rank 0: " in lines[0], lines[0]
    for k, sources in _sources_of_step(tiny_data, 5):
        assert f"sample {k} (" + ", ".join(f"{f}:{line}" for f, line in sources[:4]) in lines[0], (k, sources, lines[0])
    assert "nan_policy = 'skip'" in lines[0]
    # Nothing after step 4 was saved; step_4 stays the newest and resumable.
    assert checkpoints(work)["latest"] == "step_4" and checkpoints(work)["complete"] == ["step_2", "step_4"]
    assert max(m["step"] for m in metrics(work)) == 4


def test_nan_policy_skip_counts_the_step_and_goes_on(tiny_model, tiny_data, tmp_path):
    cfg = write_cfg(tmp_path / "run.py", tiny_model, tiny_data, nan_policy="skip")
    work = tmp_path / "w"
    env = clean_env(faults="nan_loss_at_step=3", TOKENTRAIN_CACHE=os.environ["TOKENTRAIN_CACHE"])
    r = train(cfg, "--work-dir", work, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 3: non-finite loss nan; update skipped (nan_policy='skip', 1 skipped so far)" in r.stderr
    assert "done: 12 steps (1 skipped)" in r.stderr
    m = metrics(work)
    assert [x["skipped_steps"] for x in m] == [0, 0] + [1] * 10
    # No update at step 3: the weights after step 3 are those after step 2 (checked through the
    # step-4 loss being what a run without step 3's update gives is overkill; the grad norm is NaN).
    assert m[2]["loss"] != m[2]["loss"]  # NaN recorded for the skipped step
    assert all(x["loss"] == x["loss"] for x in m[3:])  # and training stayed finite after it


def test_bad_nan_policy_is_a_config_error(tiny_model, tiny_data, tmp_path):
    r = train(write_cfg(tmp_path / "run.py", tiny_model, tiny_data, nan_policy="ignore"), "--work-dir", tmp_path / "w")
    assert r.returncode == 2 and "nan_policy" in error_lines(r.stderr)[0] and "stop, skip" in r.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_data_rewritten_under_a_running_job_is_detected(tiny_model, tmp_path, workers):
    """A data file is rewritten (other documents, same name) while training runs: the job
    stops with a one-line data error naming the file (exit 3), never trains on a wrong pack."""
    from tokentrain.data.synth import synth_dataset

    data = tmp_path / "data"
    synth_dataset(data, files=2, documents=300, seed=1, mean_length=40, vocab_size=512)
    other = tmp_path / "other"
    synth_dataset(other, files=2, documents=300, seed=9, mean_length=40, vocab_size=512)
    cfg = write_cfg(
        tmp_path / "run.py",
        tiny_model,
        data,
        max_iters=100000,
        save_steps=100000,
        dataloader_num_workers=workers,
        log_interval=1,
    )
    work = tmp_path / "w"
    proc = subprocess.Popen(
        [*TT, "train", str(cfg), "--work-dir", str(work)],
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: len(metrics(work)) >= 3, proc)
        victim = sorted(data.glob("*.bin"))[0]
        with open(victim, "r+b") as f:  # in place: the same inode, as an editor or a re-export would
            f.write(sorted(other.glob("*.bin"))[0].read_bytes())
            f.truncate()
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = error_lines(err)
    assert proc.returncode == 3, err[-3000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith(f"tokentrain: error: {victim}") and "rebuild" in lines[0], lines[0]


def test_token_id_beyond_the_vocabulary_names_file_and_line(tiny_model, tmp_path):
    from tokentrain.data.synth import synth_dataset

    data = tmp_path / "data"
    synth_dataset(data, files=1, documents=100, seed=4, mean_length=40, vocab_size=512)
    f = sorted(data.glob("*.bin"))[0]
    lines = f.read_bytes().splitlines(keepends=True)
    lines[6] = b'{"tokens": [5, 7, 9000, 11, 12]}\n'  # line 7
    # file and meta written by hand (as another tool would: no summary, so nothing refuses it at
    # start, tests/data/test_data_check_model.py): found when its batch comes up
    write_bin(f, None, raw_lines=[ln.rstrip(b"\n") for ln in lines])
    cfg = write_cfg(
        tmp_path / "run.py", tiny_model, data, shuffle_before_pack=False, max_iters=None, max_epochs=1, save_steps=1000
    )
    r = train(cfg, "--work-dir", tmp_path / "w")
    errs = error_lines(r.stderr)
    assert r.returncode == 3 and len(errs) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert errs[0].startswith(f"tokentrain: error: {f}:7: token id 9000 >= the model's vocabulary size 512"), errs[0]
    assert checkpoints(tmp_path / "w")["latest"] is None


# --------------------------------------------------------------------------- a dead rank under DeepSpeed


@pytest.mark.slow
def test_a_killed_rank_ends_a_deepspeed_job(tiny_model, tiny_data, tmp_path):
    """kill -9 of one of 2 DeepSpeed ZeRO-2 ranks under torchrun: every rank exits, non-zero,
    within 60 s (the DDP variant, under torchrun and srun, is in tests/engines)."""
    from tests.engines.test_engines import _alive, _rank_pids

    cfg = write_cfg(tmp_path / "run.py", tiny_model, tiny_data, batch_size=1, max_iters=100000, save_steps=100000)
    work = tmp_path / "w"
    cmd = torchrun_cmd(cfg, "--work-dir", work, "--deepspeed", "deepspeed_zero2")
    proc = subprocess.Popen(
        cmd, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    ranks: list[int] = []
    try:
        wait_for(lambda: len(metrics(work)) >= 2, proc, timeout=180, poll=0.2)
        ranks = _rank_pids(str(work))  # only this job's ranks, whatever else runs on the machine
        assert len(ranks) == 2, ranks
        os.kill(ranks[1], signal.SIGKILL)
        t0 = time.time()
        rc = proc.wait(timeout=90)
        elapsed = time.time() - t0
        assert rc != 0 and elapsed < 60, (rc, elapsed)
        time.sleep(1)
        assert all(not _alive(p) for p in ranks), "a rank outlived the job"
        print(f"deepspeed zero2: rank 1 killed, torchrun exited {rc} after {elapsed:.1f}s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in ranks:  # torchrun starts its workers in their own sessions: never leave one behind
            if _alive(p):
                os.kill(p, signal.SIGKILL)
