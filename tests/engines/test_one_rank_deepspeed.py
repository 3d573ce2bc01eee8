"""DeepSpeed in ONE process (the everyday single-GPU ZeRO / offload use) through the real CLI:
plain, NPROC_PER_NODE=1 and torchrun --nproc_per_node 1 all train, to the parameters of the
plain one-process engine; and 2 ranks of ZeRO-3 train a model from a config-only folder. Every
other engine under a 1-rank torchrun too (FSDP2 there once hung on a second process-group
helper that served a store nobody connected to)."""

from __future__ import annotations

import math
import re

import pytest

from tests.engines.engine_helpers import (
    clean_env,
    error_lines,
    losses,
    rel_diff,
    tokentrain,
    torchrun_cmd,
    weights,
    write_cfg,
)
from tests.helpers import config_only
from tokentrain.distributed.spawn import _free_port

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
STAGES = ["deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero2_offload", "deepspeed_zero3"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    from tokentrain.data.synth import synth_dataset
    from tokentrain.model.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("one_rank")
    model = make_tiny_model(root / "model", vocab_size=512, hidden_size=32, layers=2, heads=4)
    data = root / "data"
    synth_dataset(data, files=2, documents=300, seed=3, mean_length=40, vocab_size=512)
    cfg = write_cfg(root / "cfg.py", model, data)
    env = clean_env(TOKENTRAIN_CACHE=str(root / "cache"))
    ref = root / "reference"
    r = tokentrain("train", cfg, "--work-dir", ref, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(root=root, model=model, data=data, cfg=cfg, ref=ref, env=env, ref_log=r.stderr)


def model_line(log: str) -> str:
    """The parameter count the run logged: ZeRO-3 once counted its partition (0.00M), and its
    MFU, counted from the same parameters, was 0."""
    m = re.search(r"model: \w+, ([\d.]+M) parameters", log)
    assert m, log[-2000:]
    return m.group(1)


@pytest.mark.parametrize("stage", STAGES)
def test_one_process_deepspeed_trains_to_the_plain_engines_parameters(job, stage, tmp_path):
    work = tmp_path / "w"
    r = tokentrain("train", job["cfg"], "--work-dir", work, "--deepspeed", stage, env=job["env"])
    assert r.returncode == 0, error_lines(r.stderr) or r.stderr[-3000:]
    assert (work / "checkpoints" / "step_4" / "ds").is_dir()
    assert rel_diff(weights(work), weights(job["ref"])) <= 1e-5
    assert losses(work) == pytest.approx(losses(job["ref"]), rel=1e-5)
    assert model_line(r.stderr) == model_line(job["ref_log"])


@pytest.mark.parametrize("launch", ["NPROC_PER_NODE=1", "torchrun --nproc_per_node 1"])
def test_one_rank_launchers_with_deepspeed(job, launch, tmp_path):
    work = tmp_path / "w"
    args = [job["cfg"], "--work-dir", work, "--deepspeed", "deepspeed_zero2"]
    if launch.startswith("NPROC"):
        r = tokentrain("train", *args, env=dict(job["env"], NPROC_PER_NODE="1", PORT=str(_free_port())))
    else:
        r = _torchrun_one(args, job["env"])
    assert r.returncode == 0, error_lines(r.stderr) or r.stderr[-3000:]
    assert rel_diff(weights(work), weights(job["ref"])) <= 1e-5


def _torchrun_one(args: list, env: dict):
    import subprocess

    return subprocess.run(torchrun_cmd(*args, nproc=1), env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize(
    "engine, launch",
    [("local", "torchrun"), ("ddp", "torchrun"), ("fsdp2", "torchrun"), ("fsdp2", "NPROC_PER_NODE=1")],
)
def test_one_rank_launchers_with_every_engine(job, engine, launch, tmp_path):
    work = tmp_path / "w"
    args = [job["cfg"], "--work-dir", work, "--engine", engine]
    if launch == "torchrun":
        r = _torchrun_one(args, job["env"])
    else:
        r = tokentrain("train", *args, env=dict(job["env"], NPROC_PER_NODE="1", PORT=str(_free_port())), timeout=240)
    assert r.returncode == 0, error_lines(r.stderr) or r.stderr[-3000:]
    assert f"engine: {engine}" in r.stderr.lower()  # "engine: FSDP2 over 1 rank(s)", "engine: ddp"
    assert rel_diff(weights(work), weights(job["ref"])) <= 1e-5


def test_two_rank_zero3_trains_from_a_config_only_folder(job, tmp_path):
    """Pretraining: a model folder with config.json and tokenizer but no weights, built
    partitioned by ZeRO-3 on 2 ranks (it used to fail on DeepSpeed's batch-size check, blamed
    on pretrained_model_name_or_path)."""
    scratch = config_only(job["model"], tmp_path / "scratch")
    cfg = write_cfg(tmp_path / "cfg.py", scratch, job["data"], batch_size=2, accumulative_counts=1)
    work = tmp_path / "w"
    env = dict(job["env"], NPROC_PER_NODE="2", PORT=str(_free_port()))
    r = tokentrain("train", cfg, "--work-dir", work, "--deepspeed", "deepspeed_zero3", env=env, timeout=400)
    assert r.returncode == 0, error_lines(r.stderr) or r.stderr[-3000:]
    assert "training from scratch" in r.stderr
    got = losses(work)  # (that the loss fell in 4 steps held only for the old build-order init's draw)
    assert len(got) == 4 and all(math.isfinite(x) for x in got)
    assert re.search(r"init: \d+ tensors initialised by name from seed 7, digest [0-9a-f]{8}", r.stderr)
    assert (work / "checkpoints" / "step_4" / "ds").is_dir() and (work / "hf" / "model.safetensors").is_file()
