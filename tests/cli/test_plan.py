"""`tokentrain plan` / `train --dry-run`: the plan's figures are the run's, and it writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import checkpoint_weights, write_config
from tokentrain.cli.main import main

TT = [sys.executable, "-m", "tokentrain"]


def _cfg(path: Path, model, data, **over) -> Path:
    settings = dict(
        pretrained_model_name_or_path=str(model),
        dataset_folder=str(data) if data else None,
        max_length=256,
        batch_size=4,
        accumulative_counts=2,
        max_epochs=1,
        save_steps=1000,
        save_total_limit=2,
        evaluation_inputs=[],
        tensorboard=False,
        dtype="float32",
        seed=3,
    )
    settings.update(over)
    return write_config(path, **settings)


def _tree(folder: Path) -> dict:
    """Every path under `folder` with its size and mtime: what 'untouched' compares."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def _plan(capsys, *argv) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def _without_free(plan: dict) -> dict:
    """The plan less the disk's free space (other processes write meanwhile)."""
    return {**plan, "disk": {k: v for k, v in plan["disk"].items() if k != "free"}}


def _llama_7b(folder: Path) -> Path:
    """A config-only Llama-2-7B-shaped model folder (no weights)."""
    folder.mkdir()
    shape = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    config = dict(
        model_type="llama", vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False, **shape
    )
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.slow
def test_plan_matches_a_real_run_and_writes_nothing(tiny_model, tiny_data, tmp_path):
    cfg = _cfg(tmp_path / "run.py", tiny_model, tiny_data)
    work, cache = tmp_path / "work", tmp_path / "cache"
    env = dict(os.environ, TOKENTRAIN_CACHE=str(cache), OMP_NUM_THREADS="1")
    before = _tree(tiny_data)

    def cli(*argv):
        r = subprocess.run([*TT, *argv], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    plan = json.loads(cli("plan", str(cfg), "--work-dir", str(work), "--json"))
    dry = json.loads(cli("train", str(cfg), "--work-dir", str(work), "--dry-run", "--json"))
    assert _without_free(dry) == _without_free(plan)
    assert not work.exists() and not cache.exists()  # no work dir, lock, index cache or meta written
    assert _tree(tiny_data) == before
    text = cli("train", str(cfg), "--work-dir", str(work), "--dry-run")
    for section in ("config (resolved)", "\ndata\n", "\nmodel", "memory per GPU", "checkpoints and export", "time"):
        assert section in text

    cli("train", str(cfg), "--work-dir", str(work))
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines() if '"step"' in line]
    last = records[-1]
    assert plan["data"]["steps"] == last["step"] == last["total_steps"]
    assert plan["data"]["tokens"] == last["tokens"]  # packs are full: every step max_length x global batch
    assert plan["data"]["tokens_per_step"] * last["step"] == last["tokens"]
    folder = work / "checkpoints" / (work / "checkpoints/latest").read_text().strip()
    assert plan["model"]["params"] == sum(t.numel() for t in checkpoint_weights(work).values())
    on_disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert abs(plan["disk"]["checkpoint"] - on_disk) <= 0.1 * on_disk
    export = sum(p.stat().st_size for p in (work / "hf").glob("*.safetensors"))
    assert abs(plan["disk"]["export"] - export) <= 0.1 * export

    # planning the run's continuation reads the work dir and leaves it as it is
    snapshot = _tree(work)
    again = json.loads(cli("plan", str(cfg), "--work-dir", str(work), "--resume", "auto", "--json"))
    assert again["data"]["steps"] == plan["data"]["steps"]
    assert _tree(work) == snapshot


def test_7b_config_only_plans_84gb_checkpoints_and_28gb_export(tiny_data, tmp_path, capsys):
    model = _llama_7b(tmp_path / "llama-7b")
    cfg = _cfg(tmp_path / "run.py", model, tiny_data, max_length=2048, batch_size=1, accumulative_counts=1)
    plan = _plan(capsys, "plan", str(cfg), "--work-dir", str(tmp_path / "w"), "--gpu-memory", "80GiB", "--json")
    h, i, v, layers = 4096, 11008, 32000, 32
    assert plan["model"]["params"] == 2 * v * h + layers * (4 * h * h + 3 * h * i + 2 * h) + h
    ckpt, export = plan["disk"]["checkpoint"], plan["disk"]["export"]
    assert ckpt == 12 * plan["model"]["params"] and 78e9 < ckpt < 90e9  # fp32 weights + AdamW m, v: ~84 GB
    assert export == 4 * plan["model"]["params"] and 26e9 < export < 30e9  # the fp32 hf/ export: ~28 GB
    rows = {r["engine"]: r for r in plan["memory"]["engines"]}
    assert plan["memory"]["chosen"] == "local" and rows["local"]["total"] > 80 * 2**30
    assert any("exceeds 80 GiB" in w for w in plan["warnings"])  # a warning, not a failure

    # 2 ranks of FSDP2: the model states are sharded, the activations are not
    plan2 = _plan(capsys, "train", str(cfg), "--dry-run", "--engine", "fsdp2", "--world-size", "2", "--json")
    rows2 = {r["engine"]: r for r in plan2["memory"]["engines"]}
    assert plan2["memory"]["chosen"] == "fsdp2"
    assert rows2["fsdp2"]["optimizer"] == pytest.approx(8 * plan["model"]["params"] / 2)
    assert rows2["fsdp2"]["activations"] == rows["local"]["activations"]
    assert plan2["data"]["global_batch"] == 2


def test_dry_run_takes_every_train_option(tiny_model, tiny_data, tmp_path, capsys, monkeypatch):
    cfg = _cfg(tmp_path / "run.py", tiny_model, tiny_data)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("NPROC_PER_NODE", "2")  # train would start torchrun; a dry run does not
    argv = ["train", str(cfg), "--dry-run", "--json", "--work-dir", str(tmp_path / "w"), "--launcher", "pytorch"]
    argv += ["--deepspeed", "deepspeed_zero3_offload", "--cfg-options", "max_length=64", "--seed", "5"]
    plan = _plan(capsys, *argv)
    assert plan["world_size"] == 2 and plan["engine"] == "deepspeed"
    assert plan["memory"]["chosen"] == "deepspeed ZeRO-3 + offload"
    assert plan["resolved_config"]["max_length"] == 64 and plan["resolved_config"]["seed"] == 5
    assert plan["data"]["global_batch"] == 2 * 4 * 2
    assert not (tmp_path / "w").exists()


def test_hub_id_without_local_config_plans_without_model_size(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # an empty Hugging Face cache
    cfg = _cfg(tmp_path / "run.py", "some-org/not-downloaded-7b", tiny_data)
    plan = _plan(capsys, "plan", str(cfg), "--json")
    assert "not in the local Hugging Face cache" in plan["model"]["unknown"]
    assert "memory" not in plan and plan["data"]["steps"] > 0
    assert any("model size unknown" in w for w in plan["warnings"])


def test_plan_errors_are_one_line(tiny_model, tiny_data, tmp_path, capsys):
    cfg = _cfg(tmp_path / "run.py", tiny_model, tiny_data, max_lenght=64)
    assert main(["plan", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "max_lenght" in err and "max_length" in err
    good = _cfg(tmp_path / "good.py", tiny_model, tiny_data)
    assert main(["train", str(good), "--json"]) == 2  # a plan option without --dry-run
    assert "--dry-run" in capsys.readouterr().err
    assert main(["plan", str(good), "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory 'lots'" in capsys.readouterr().err


def test_mixture_plan_per_source_is_data_stats(tiny_model, tiny_data, val_data, tmp_path, capsys):
    sources = [dict(folder=str(tiny_data), weight=0.9, name="web"), dict(folder=str(val_data), weight=0.1, name="code")]
    cfg = _cfg(tmp_path / "mix.py", tiny_model, None, datasets=sources, max_length=128, max_epochs=2)
    plan = _plan(capsys, "plan", str(cfg), "--json")
    stats = _plan(capsys, "data", "stats", "--config", str(cfg), "--json")
    assert plan["data"]["steps"] == stats["planned_steps"] and plan["data"]["samples"] == stats["mixture_samples"]
    for mine, theirs in zip(plan["data"]["sources"], stats["sources"], strict=True):
        for key in ("name", "samples", "planned_samples", "epochs", "tokens"):
            assert mine[key] == theirs[key], key
    assert any("over-sampled" in w and "code" in w for w in plan["warnings"])


@pytest.mark.distributed
def test_dry_run_under_torchrun_prints_one_plan(tiny_model, tiny_data, tmp_path):
    """Every rank of a launched dry run checks the config; the job's plan is printed once."""
    from tests.reliability.helpers import clean_env, torchrun_cmd

    cfg = _cfg(tmp_path / "run.py", tiny_model, tiny_data)
    env = clean_env(TOKENTRAIN_CACHE=os.environ["TOKENTRAIN_CACHE"])
    r = subprocess.run(torchrun_cmd(cfg, "--dry-run", "--json"), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    plan = json.loads(r.stdout)  # one JSON document: a second rank's would make this fail
    assert plan["world_size"] == 2 and plan["data"]["global_batch"] == 2 * 4 * 2
    assert not (tmp_path / "work_dirs").exists() and not (Path.cwd() / "work_dirs" / "run").exists()
