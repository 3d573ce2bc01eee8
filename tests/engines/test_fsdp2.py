"""FSDP2 through the real CLI on real gloo ranks (CPU, fp32): the same parameters as one
process at 1 and 2 ranks, a model built sharded from a config-only folder, resume across
world sizes (2 -> 1 -> 2), `convert pth_to_hf` of its DCP checkpoints (tied and untied
embeddings), and crafted pickle payloads in those checkpoints that never run."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.engines.engine_helpers import copy_checkpoint
from tests.helpers import config_only

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SETTINGS = dict(
    max_length=128,
    batch_size=1,
    accumulative_counts=2,
    max_iters=6,
    lr=1e-3,
    warm_up_ratio=0.25,
    save_steps=2,
    save_total_limit=-1,
    evaluation_freq=1000,
    evaluation_inputs=[],
    log_interval=1,
    tensorboard=False,
    dtype="float32",
    seed=7,
)


def clean_env(**extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_", "TORCHELASTIC", "NPROC_PER_NODE"))
    }
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def tokentrain(*args, nproc: int = 1, cache: str = "", timeout: int = 400) -> subprocess.CompletedProcess:
    extra = {"NPROC_PER_NODE": str(nproc)} if nproc > 1 else {}
    return subprocess.run(
        [sys.executable, "-m", "tokentrain", *map(str, args)],
        env=clean_env(TOKENTRAIN_CACHE=cache, **extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r


def weights(work: Path) -> dict:
    return load_file(str(work / "hf" / "model.safetensors"))


def losses(work: Path) -> dict[int, float]:
    rows = [json.loads(r) for r in (work / "metrics.jsonl").read_text().splitlines() if r.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).norm() / max(b[k].double().norm(), 1e-12)) for k in a)


def logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.arange(5, 40)[None]).logits


class Job:
    """Model folders, data, configs and the runs several tests share (each run once, on demand)."""

    def __init__(self, root: Path):
        from tokentrain.data.synth import synth_dataset
        from tokentrain.model.tiny import make_tiny_model

        self.root, self.cache = root, str(root / "cache")
        self.model = make_tiny_model(root / "model", vocab_size=512, hidden_size=32, layers=2, heads=4)
        self.tied = make_tiny_model(root / "tied", vocab_size=512, hidden_size=32, layers=2, heads=4, seed=1,
                                    tie_word_embeddings=True)  # fmt: skip
        self.config_only = config_only(self.model, root / "config_only")
        self.data = root / "data"
        synth_dataset(self.data, files=2, documents=300, seed=3, mean_length=40, vocab_size=512)
        self.cfg = self.config(self.model, "cfg.py")
        self._runs: dict[str, Path] = {}

    def config(self, model: Path, name: str, **extra) -> Path:
        settings = dict(SETTINGS, pretrained_model_name_or_path=str(model), dataset_folder=str(self.data), **extra)
        path = self.root / name
        path.write_text("".join(f"{k} = {v!r}\n" for k, v in settings.items()))
        return path

    def run(self, name: str, cfg: Path, *args, nproc: int = 1) -> Path:
        """`tokentrain train CFG ARGS` into work dir `name`, once; with 2 ranks the global batch
        stays 2 (accumulation 1)."""
        if name not in self._runs:
            work = self.root / name
            more = ["--cfg-options", "accumulative_counts=1"] if nproc == 2 else []
            ok(tokentrain("train", cfg, "--work-dir", work, *args, *more, nproc=nproc, cache=self.cache))
            self._runs[name] = work
        return self._runs[name]

    def config_only_cfg(self) -> Path:
        """The config-only folder, engine chosen by the config key, with validation and generation."""
        return self.config(
            self.config_only,
            "config_only.py",
            engine="fsdp2",
            val_dataset_folder=str(self.data),
            evaluation_inputs=["hello"],
            evaluation_max_new_tokens=4,
        )

    @property
    def reference(self) -> Path:
        """One process, no FSDP: the run every engine must reproduce."""
        return self.run("reference", self.cfg)


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Job:
    return Job(tmp_path_factory.mktemp("fsdp2"))


def test_one_rank_fsdp2_trains_from_weights_and_from_a_config_only_folder(job):
    ref = job.reference
    work = job.run("fsdp2_1", job.cfg, "--engine", "fsdp2")
    assert rel_diff(weights(work), weights(ref)) <= 1e-5
    assert list(losses(work).values()) == pytest.approx(list(losses(ref).values()), rel=1e-5)
    assert (work / "checkpoints" / "step_2" / "fsdp" / ".metadata").is_file()
    assert torch.allclose(logits(work / "hf"), logits(ref / "hf"), rtol=1e-5, atol=1e-6)

    # The engine chosen by the config key; the model built sharded from config.json alone.
    cfg = job.config_only_cfg()
    r = tokentrain("train", cfg, "--work-dir", job.root / "config_only_1", cache=job.cache)
    ok(r)
    assert "building it sharded" in r.stderr
    job._runs["config_only_1"] = job.root / "config_only_1"
    out = logits(job.root / "config_only_1" / "hf")
    assert out.shape == (1, 35, 512) and torch.isfinite(out).all()
    assert len(losses(job.root / "config_only_1")) == 6


def test_two_ranks_fsdp2_match_one_process_and_the_sharded_build_does_not_depend_on_world_size(job):
    work = job.run("fsdp2_2", job.cfg, "--engine", "fsdp2", nproc=2)
    assert rel_diff(weights(work), weights(job.reference)) <= 1e-5
    assert list(losses(work).values()) == pytest.approx(list(losses(job.reference).values()), rel=1e-5)
    assert sorted(p.name for p in (work / "checkpoints" / "step_2" / "fsdp").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    # Config-only, 2 ranks: each unit initialised by name (model/init.py), then sharded.
    one = job.run("config_only_1", job.config_only_cfg())
    two = job.run("config_only_2", job.config_only_cfg(), nproc=2)
    assert rel_diff(weights(two), weights(one)) <= 1e-5
    # Validation and generation run through the sharded model on every rank.
    last = [json.loads(r) for r in (two / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["val_loss"] == pytest.approx(
        [json.loads(r) for r in (one / "metrics.jsonl").read_text().splitlines()][-1]["val_loss"], rel=1e-5
    )
    samples = [json.loads(r) for r in (two / "generations.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 6] and all(s["input"] == "hello" for s in samples)


def test_resume_two_ranks_then_one_then_two_reproduces_the_uninterrupted_run(job):
    """2 ranks to step 2 -> 1 rank (accumulation 2: the same global batch) to step 4 -> 2 ranks to 6."""
    full = job.run("fsdp2_2", job.cfg, "--engine", "fsdp2", nproc=2)
    one = job.root / "resume_1"
    copy_checkpoint(full / "checkpoints" / "step_2", one)
    ok(tokentrain("train", job.cfg, "--work-dir", one, "--engine", "fsdp2", "--resume", "auto", cache=job.cache))
    two = job.root / "resume_2"
    copy_checkpoint(one / "checkpoints" / "step_4", two)
    ok(
        tokentrain(
            "train",
            job.cfg,
            "--work-dir",
            two,
            "--engine",
            "fsdp2",
            "--resume",
            "auto",
            "--cfg-options",
            "accumulative_counts=1",
            nproc=2,
            cache=job.cache,
        )
    )
    want = losses(full)
    for leg, steps in ((one, [3, 4, 5, 6]), (two, [5, 6])):
        got = losses(leg)
        assert sorted(got) == steps, leg.name
        assert [got[s] for s in steps] == pytest.approx([want[s] for s in steps], rel=1e-6), leg.name
    assert rel_diff(weights(two), weights(full)) <= 1e-5


def test_convert_fsdp2_checkpoints_gives_the_runs_own_export(job, tmp_path):
    untied = job.run("fsdp2_2", job.cfg, "--engine", "fsdp2", nproc=2)
    tied_cfg = job.config(job.tied, "tied.py", max_iters=2)
    tied = job.run("tied_2", tied_cfg, "--engine", "fsdp2", nproc=2)
    for cfg, work in ((job.cfg, untied), (tied_cfg, tied)):
        out = tmp_path / work.name
        ok(tokentrain("convert", "pth_to_hf", cfg, work, out))  # the work dir: its latest checkpoint
        assert torch.equal(logits(out), logits(work / "hf")), work.name
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tied_2")
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


class Payload:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def reseal(step: Path) -> None:
    """Rewrite the checkpoint's manifest as an attacker would, so only the loader stands in the way."""
    from tokentrain.checkpoint.manager import COMPLETE, manifest

    info = json.loads((step / COMPLETE).read_text())
    info["files"] = manifest(step)
    (step / COMPLETE).write_text(json.dumps(info))


def test_crafted_pickles_in_an_fsdp2_checkpoint_never_run(job, tmp_path):
    full = job.run("fsdp2_2", job.cfg, "--engine", "fsdp2", nproc=2)
    marker = tmp_path / "PWNED"

    # 1. DCP's index (.metadata) replaced by a payload: resume and convert refuse it.
    work = tmp_path / "w"
    step = copy_checkpoint(full / "checkpoints" / "step_2", work)
    (step / "fsdp" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    reseal(step)
    r = tokentrain("train", job.cfg, "--work-dir", work, "--engine", "fsdp2", "--resume", str(step), cache=job.cache)
    assert r.returncode == 3, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert ".metadata: refused" in last and "posix.system" in last, last
    r = tokentrain("convert", "pth_to_hf", job.cfg, step, tmp_path / "out")
    assert r.returncode == 3 and ".metadata: refused" in r.stderr, r.stderr[-3000:]

    # 2. A well-formed DCP checkpoint whose lm_head is a pickled object (DCP would torch.load
    #    it with weights_only=False).
    from tokentrain.engines.fsdp2_checkpoint import read_full_state_dict

    state = read_full_state_dict(full / "checkpoints" / "step_2")
    state["lm_head.weight"] = Payload(marker)
    step2 = copy_checkpoint(full / "checkpoints" / "step_2", tmp_path / "w2")
    shutil.rmtree(step2 / "fsdp")
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": state}, checkpoint_id=str(step2 / "fsdp"), no_dist=True)
    reseal(step2)
    r = tokentrain("convert", "pth_to_hf", job.cfg, step2, tmp_path / "out2")
    assert r.returncode == 3 and "'model.lm_head.weight' is not a tensor" in r.stderr, r.stderr[-3000:]
    assert not marker.exists()


def test_deepspeed_and_fsdp2_together_is_a_usage_error(job):
    r = tokentrain("train", job.cfg, "--engine", "fsdp2", "--deepspeed", "deepspeed_zero2")
    assert r.returncode == 2 and "exclude each other" in r.stderr.strip().splitlines()[-1]


def test_cpu_offload_trains_the_same_and_a_nonfinite_gradient_on_one_rank_skips_on_all(job, tmp_path):
    work = job.run("offload_1", job.cfg, "--engine", "fsdp2", "--cfg-options", "fsdp_cpu_offload=True")
    assert rel_diff(weights(work), weights(job.reference)) <= 1e-5

    # An inf in rank 1's gradient shard only: the norm is global, so both ranks skip step 2.
    from tokentrain.engines.fsdp2_checkpoint import read_full_state_dict

    work = tmp_path / "inf"
    r = subprocess.run(
        [sys.executable, "-m", "tokentrain", "train", str(job.cfg), "--work-dir", str(work), "--engine", "fsdp2",
         "--cfg-options", "accumulative_counts=1", "max_iters=2", "save_steps=1", "nan_policy=skip"],
        env=clean_env(TOKENTRAIN_CACHE=job.cache, NPROC_PER_NODE="2",
                      TOKENTRAIN_FAULT_INJECT="inf_grad_at_step=2,rank=1"),
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    ok(r)
    assert "step 2: non-finite gradient norm inf; update skipped" in r.stderr
    a, b = (read_full_state_dict(work / "checkpoints" / f"step_{s}") for s in (1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rel_diff(weights(work), b) == 0.0
