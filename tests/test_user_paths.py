"""The paths users take, end to end, through the real CLI and outside the checkout.

For each engine, at 1 rank and 2 ranks, from a model folder with weights and from a
config-only one (training from scratch): copy-cfg the shipped template into an empty
folder, train with its PART 1 overridden, stop after a checkpoint, resume to the end,
then convert the last checkpoint with `convert pth_to_hf` and check that its logits equal
the run's own `hf/` export. Nothing here imports the trainer: only processes a user starts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TT = [sys.executable, "-m", "tokentrain"]
VOCAB = 512

# (engine flags, ranks, model folder kind): each sharding engine at 1 and 2 ranks, from weights
# and from a config-only folder (the engines' own tests compare parameters in detail).
CASES = [
    pytest.param([], 2, "config-only", id="ddp-2ranks-config-only"),
    pytest.param(["--deepspeed", "deepspeed_zero2"], 1, "weights", id="zero2-1rank-weights"),
    pytest.param(["--deepspeed", "deepspeed_zero3"], 2, "config-only", id="zero3-2ranks-config-only"),
    pytest.param(["--engine", "fsdp2"], 1, "config-only", id="fsdp2-1rank-config-only"),
    pytest.param(["--engine", "fsdp2"], 2, "weights", id="fsdp2-2ranks-weights"),
]


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """What a user has: a model folder with weights, one with only config + tokenizer
    (both tie their embeddings, as Qwen2-0.5B / Llama-3.2-1B do), and a dataset."""
    from tokentrain.data.synth import synth_dataset
    from tokentrain.model.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("user")
    weights = make_tiny_model(
        root / "model-weights", vocab_size=VOCAB, hidden_size=32, layers=2, heads=4, tie_word_embeddings=True
    )
    config_only = root / "model-config-only"
    config_only.mkdir()
    for f in Path(weights).iterdir():
        if not f.name.endswith((".safetensors", ".bin")) and f.name != "model.safetensors.index.json":
            shutil.copy(f, config_only / f.name)
    data = root / "data"
    synth_dataset(data, files=2, documents=200, seed=1, mean_length=40, vocab_size=VOCAB)
    return {"weights": Path(weights), "config-only": config_only, "data": data}


def _env(ranks: int, tmp: Path) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_", "TORCHELASTIC", "NPROC_PER_NODE"))
    }
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TOKENTRAIN_CACHE=str(tmp / "cache"))
    if ranks > 1:
        from tokentrain.distributed.spawn import _free_port

        env.update(NPROC_PER_NODE=str(ranks), PORT=str(_free_port()))
    return env


def _tt(*args, cwd: Path, env: dict, timeout: int = 420) -> subprocess.CompletedProcess:
    r = subprocess.run([*TT, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    return r


def _edit(cfg: Path, **settings) -> None:
    """Change PART 1 the way a user does: rewrite each `key = value` line of the copied file."""
    lines = cfg.read_text().splitlines()
    for key, value in settings.items():
        at = [i for i, line in enumerate(lines) if line.startswith(f"{key} =")]
        if at:
            lines[at[0]] = f"{key} = {value!r}"
        else:
            lines.append(f"{key} = {value!r}")
    cfg.write_text("\n".join(lines) + "\n")


def _logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.arange(3, 3 + 48).reshape(2, 24)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("engine, ranks, kind", CASES)
def test_train_stop_resume_convert(engine, ranks, kind, user_files, tmp_path):
    if "--deepspeed" in engine:
        pytest.importorskip("deepspeed")  # installed by `make test` (the test extra): never skipped in CI
    env = _env(ranks, tmp_path)
    cwd = tmp_path / "job"  # an empty folder outside the checkout, as a user's
    cwd.mkdir()
    _tt("copy-cfg", "tiny_demo", ".", cwd=cwd, env=env)
    cfg = cwd / "tiny_demo_copy.py"
    assert cfg.is_file()
    _edit(
        cfg,
        pretrained_model_name_or_path=str(user_files[kind]),
        dataset_folder=str(user_files["data"]),
        max_length=128,
        batch_size=2,
        dataloader_num_workers=0,
        max_iters=4,
        save_steps=2,
        save_total_limit=-1,
        evaluation_freq=100,
        evaluation_inputs=[],
        log_interval=1,
        tensorboard=False,
        lr=0.001,
    )
    work = cwd / "work"
    # 1) a first job that ends after step 4 (a checkpoint at 2 and 4) ...
    r = _tt("train", cfg, *engine, "--work-dir", work, cwd=cwd, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    first = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in first] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in first)
    # 2) ... and a second one that resumes it to step 6: `auto` at 1 rank; at 2 ranks from a copy
    # of the checkpoint kept under another name, as users keep one (every rank must take it).
    resume = "auto"
    if ranks > 1:
        resume = cwd / "kept-checkpoint"
        shutil.copytree(work / "checkpoints" / "step_4", resume)
    r = _tt(
        "train",
        cfg,
        *engine,
        "--work-dir",
        work,
        "--resume",
        resume,
        "--cfg-options",
        "max_iters=6",
        cwd=cwd,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "at step 4" in r.stderr, r.stderr[-3000:]
    steps = [json.loads(x)["step"] for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (work / "checkpoints" / "latest").read_text().strip() == "step_6"
    # 3) the run's own export and a conversion of its last checkpoint give the same logits.
    hf = work / "hf"
    assert (hf / "config.json").is_file()
    conv = cwd / "converted"
    r = _tt("convert", "pth_to_hf", cfg, work, conv, cwd=cwd, env=_env(1, tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _logits(hf), _logits(conv)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()
