"""A mixed run through the real CLI: stopped after a checkpoint (SIGTERM) and resumed with
--resume auto, it reproduces the uninterrupted run's losses and per-source token counts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tokentrain.data.synth import synth_dataset
from tokentrain.model.tiny import make_tiny_model

TT = [sys.executable, "-m", "tokentrain"]
VOCAB = 512


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    model = make_tiny_model(root / "tiny", vocab_size=VOCAB, hidden_size=32, layers=2, heads=4)
    folders = {}
    for i, (name, docs) in enumerate({"web": 120, "code": 150, "books": 60}.items()):
        synth_dataset(root / name, files=1, documents=docs, seed=10 + i, mean_length=40, vocab_size=VOCAB)
        folders[name] = root / name
    return root, model, folders


def _metrics(work):
    return [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_mixed_run_stopped_and_resumed_reproduces_losses_bit_for_bit(setup, tmp_path):
    _, model, folders = setup
    weights = {"web": 0.6, "code": 0.3, "books": 0.1}
    settings = dict(
        pretrained_model_name_or_path=str(model),
        datasets=[dict(folder=str(folders[n]), weight=w, name=n) for n, w in weights.items()],
        max_length=64,
        batch_size=2,
        accumulative_counts=2,
        dataloader_num_workers=1,
        max_iters=40,
        lr=1e-3,
        save_steps=1000,
        evaluation_freq=1000,
        log_interval=1,
        tensorboard=False,
        dtype="float32",
        seed=3,
    )
    cfg = tmp_path / "mix.py"
    cfg.write_text("".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    env = dict(os.environ, TOKENTRAIN_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    full = subprocess.run(
        [*TT, "train", str(cfg), "--work-dir", str(tmp_path / "a")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert full.returncode == 0, full.stderr[-2000:]
    assert "mixture source books: weight 0.1000" in full.stderr
    assert "over-sampled" in full.stderr  # 40 steps x 4 samples: web is read more than once

    work = tmp_path / "b"
    proc = subprocess.Popen(
        [*TT, "train", str(cfg), "--work-dir", str(work)], env=env, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (work / "metrics.jsonl").is_file() and len((work / "metrics.jsonl").read_text().splitlines()) >= 5
    ):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 75, err[-2000:]
    stopped = int((work / "checkpoints/latest").read_text().strip().split("_")[1])
    assert 5 <= stopped < 40
    resumed = subprocess.run(
        [*TT, "train", str(cfg), "--work-dir", str(work), "--resume", "auto"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {stopped}" in resumed.stderr

    a, b = _metrics(tmp_path / "a"), _metrics(work)
    assert [r["step"] for r in b] == list(range(1, 41))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    keys = [f"tokens/{n}" for n in weights]
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    last = a[-1]
    assert sum(last[k] for k in keys) == last["tokens"] == 40 * 4 * 64
    shares = [last[k] / last["tokens"] for k in keys]
    assert max(abs(s - w) for s, w in zip(shares, weights.values())) < 0.02


@pytest.mark.slow
def test_two_ranks_read_the_same_mixture_as_one_process(setup, tmp_path):
    """2 gloo ranks x accumulation 2 = 1 process x accumulation 4: same losses, same tokens per
    source (summed over ranks); the log lines name their rank."""
    import re

    _, model, folders = setup
    settings = dict(
        pretrained_model_name_or_path=str(model),
        datasets=[dict(folder=str(folders[n]), weight=w) for n, w in (("web", 5), ("code", 3), ("books", 2))],
        max_length=64,
        batch_size=1,
        accumulative_counts=2,
        max_iters=6,
        lr=1e-3,
        save_steps=1000,
        evaluation_freq=1000,
        log_interval=1,
        tensorboard=False,
        dtype="float32",
        seed=5,
    )
    cfg = tmp_path / "mix2.py"
    cfg.write_text("".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_", "TORCHELASTIC", "NPROC_PER_NODE"))
    }
    env.update(TOKENTRAIN_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    one = subprocess.run(
        [*TT, "train", str(cfg), "--work-dir", str(tmp_path / "one"), "--cfg-options", "accumulative_counts=4"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [*TT, "train", str(cfg), "--work-dir", str(tmp_path / "two")],
        env=dict(env, NPROC_PER_NODE="2"), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert re.search(r"^\[tokentrain rank 0\] [\d-]+ [\d:]+ step 6/6 ", two.stderr, re.M), two.stderr[-2000:]
    a, b = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    keys = ["tokens/web", "tokens/code", "tokens/books"]
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
