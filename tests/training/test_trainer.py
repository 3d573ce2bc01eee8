"""The loss rule: parameters after a step do not depend on how the global batch is split;
steps without targets are skipped; resuming is bit-identical; checkpoints are kept as asked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import checkpoint_weights, local_env, make_config, max_rel_diff, metrics, train, write_config
from tokentrain.training.trainer import Trainer

SPLITS = [(4, 1), (1, 4), (2, 2)]
# The seed template's lr. What remains between splits is fp32 summation order; AdamW
# divides each gradient by its own magnitude, so coordinates whose gradient is near eps
# amplify that roundoff in proportion to lr (at lr=1e-3 the same runs differ by ~2e-6).
SPLIT_LR = 4e-5


@pytest.fixture(scope="module")
def split_runs(tiny_model, tiny_data, tmp_path_factory):
    out = {}
    for mbs, acc in SPLITS:
        work = tmp_path_factory.mktemp(f"split_{mbs}x{acc}")
        cfg = make_config(tiny_model, tiny_data, batch_size=mbs, accumulative_counts=acc, max_iters=2, lr=SPLIT_LR)
        assert train(cfg, work) == 0
        out[(mbs, acc)] = work
    return out


def test_parameters_do_not_depend_on_micro_batch_split(split_runs):
    ref = checkpoint_weights(split_runs[(4, 1)], 2)
    start = None
    for split, work in split_runs.items():
        w = checkpoint_weights(work, 2)
        assert max_rel_diff(w, ref) <= 1e-6, split
        losses = [r["loss"] for r in metrics(work)]
        assert len(losses) == 2
        start = start or losses
        assert losses == pytest.approx(start, rel=1e-6)
    targets = [r["target_tokens"] for r in metrics(split_runs[(1, 4)])]
    assert all(t > 0 for t in targets)


@pytest.mark.slow
def test_two_ddp_ranks_give_the_same_parameters(split_runs, tiny_model, tiny_data, tmp_path):
    """2 gloo ranks x batch 1 x accumulation 2 == one process x batch 4 (real torchrun, via NPROC_PER_NODE)."""
    cfg = write_config(
        tmp_path / "ddp.py",
        **dict(
            json.loads(
                json.dumps(
                    dict(
                        pretrained_model_name_or_path=str(tiny_model),
                        dataset_folder=str(tiny_data),
                        max_length=128,
                        batch_size=1,
                        accumulative_counts=2,
                        max_iters=2,
                        lr=SPLIT_LR,
                        warm_up_ratio=0.0,
                        save_steps=1000,
                        save_total_limit=-1,
                        evaluation_inputs=[],
                        log_interval=1,
                        tensorboard=False,
                        dtype="float32",
                        seed=7,
                    )
                )
            ).items()
        ),
    )
    env = dict(os.environ, NPROC_PER_NODE="2", OMP_NUM_THREADS="1")
    env.pop("LOCAL_RANK", None)
    r = subprocess.run(
        [sys.executable, "-m", "tokentrain", "train", str(cfg), "--work-dir", str(tmp_path / "w")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ref = checkpoint_weights(split_runs[(4, 1)], 2)
    assert max_rel_diff(checkpoint_weights(tmp_path / "w", 2), ref) <= 1e-6
    assert [m["loss"] for m in metrics(tmp_path / "w")] == pytest.approx(
        [m["loss"] for m in metrics(split_runs[(4, 1)])], rel=1e-6
    )


def test_unpacked_padded_batches_equal_one_document_at_a_time(tiny_model, tiny_data, tmp_path):
    """pack_to_max_length=False: rows of different lengths are padded; padding changes nothing."""
    cfg = make_config(tiny_model, tiny_data, pack_to_max_length=False, max_length=64, max_iters=2, lr=4e-5)
    assert train(cfg.replace(batch_size=4), tmp_path / "b4") == 0
    assert train(cfg.replace(batch_size=1, accumulative_counts=4), tmp_path / "b1") == 0
    assert max_rel_diff(checkpoint_weights(tmp_path / "b4", 2), checkpoint_weights(tmp_path / "b1", 2)) <= 1e-6
    recs = metrics(tmp_path / "b4")
    assert all(r["tokens"] <= 4 * 64 * r["step"] for r in recs)  # real tokens: padding is not counted


def test_steps_without_target_tokens_are_skipped_not_nan(tiny_model, tmp_path):
    from tokentrain.data.synth import write_file

    data = tmp_path / "prompts_only"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    docs = [(-torch.randint(3, 500, (50,), generator=g)).numpy() for _ in range(200)]
    # One document with targets: a set with none at all is refused before step 1 (tests/reliability).
    write_file(data / "a.bin", [*docs, torch.randint(3, 500, (50,), generator=g).numpy()])
    cfg = make_config(tiny_model, data, batch_size=2, max_iters=3)
    before = checkpoint_weights_from_model(tiny_model)
    assert train(cfg, tmp_path / "w") == 0
    recs = metrics(tmp_path / "w")
    assert [r["loss"] for r in recs] == [0.0, 0.0, 0.0]
    assert recs[-1]["skipped_steps"] == 3 and all(r["target_tokens"] == 0 for r in recs)
    assert max_rel_diff(checkpoint_weights(tmp_path / "w", 3), before) == 0.0


def checkpoint_weights_from_model(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


@pytest.fixture(scope="module")
def dropout_model(tiny_model, tmp_path_factory):
    """The tiny model with attention dropout, so resuming must restore the RNG to match."""
    import shutil

    out = tmp_path_factory.mktemp("dropout") / "m"
    shutil.copytree(tiny_model, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["attention_dropout"] = 0.1
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _preempt_during(trainer: Trainer, step: int) -> None:
    """Act as if SIGUSR1 arrived while `step` was being computed."""
    advance = trainer.metrics.advance

    def hook(n=1, loss=None):
        advance(n, loss)
        if trainer.step == step - 1:
            trainer.preemption.signal = signal.SIGUSR1

    trainer.metrics.advance = hook


def test_resume_is_bit_identical(dropout_model, tiny_data, tmp_path):
    cfg = make_config(
        dropout_model,
        tiny_data,
        batch_size=2,
        accumulative_counts=2,
        max_iters=6,
        save_steps=4,
        dataloader_num_workers=1,
        warm_up_ratio=0.3,
    )
    assert train(cfg, tmp_path / "a") == 0

    t = Trainer(cfg.replace(work_dir=str(tmp_path / "b")), local_env(), tmp_path / "b")
    t.setup()
    _preempt_during(t, 3)
    assert t.fit() == 75
    assert (tmp_path / "b/checkpoints/latest").read_text().strip() == "step_3"
    assert train(cfg, tmp_path / "b", resume="auto") == 0

    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    wa, wb = checkpoint_weights(tmp_path / "a", 6), checkpoint_weights(tmp_path / "b", 6)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    oa = torch.load(tmp_path / "a/checkpoints/step_6/optimizer.pt", weights_only=True)
    ob = torch.load(tmp_path / "b/checkpoints/step_6/optimizer.pt", weights_only=True)
    assert all(torch.equal(oa["state"][i]["exp_avg_sq"], ob["state"][i]["exp_avg_sq"]) for i in oa["state"])


def test_checkpoints_latest_pointer_and_save_total_limit(tiny_model, tiny_data, tmp_path):
    cfg = make_config(tiny_model, tiny_data, max_iters=5, save_steps=2, save_total_limit=2)
    assert train(cfg, tmp_path / "w") == 0
    root = tmp_path / "w/checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_4", "step_5"]
    assert (root / "latest").read_text().strip() == "step_5"
    ck = root / "step_5"
    assert {"model.safetensors", "optimizer.pt", "trainer_state.pt", "rng_rank0.pt", "config.json", "COMPLETE"} <= {
        p.name for p in ck.iterdir()
    }
    state = torch.load(ck / "trainer_state.pt", weights_only=True)
    assert state["trainer"]["step"] == 5 and state["sampler"]["consumed"] == 5 and state["scheduler"]["step"] == 5
    assert json.loads((ck / "config.json").read_text())["max_iters"] == 5

    # An incomplete newer checkpoint (crash while writing) is never resumed from.
    from tokentrain.checkpoint.manager import find_latest, resolve_resume

    (root / "step_9").mkdir()
    (root / "latest").write_text("step_9\n")
    assert find_latest(root) == ck
    assert resolve_resume("auto", tmp_path / "nothing_here") is None
    assert resolve_resume(str(tmp_path / "w"), root) == ck

    # save_total_limit = -1 keeps every checkpoint
    cfg = make_config(tiny_model, tiny_data, max_iters=4, save_steps=1, save_total_limit=-1)
    assert train(cfg, tmp_path / "all") == 0
    assert sorted(p.name for p in (tmp_path / "all/checkpoints").glob("step_*")) == [
        "step_1",
        "step_2",
        "step_3",
        "step_4",
    ]


def test_validation_loss_and_generation_are_logged(tiny_model, tiny_data, val_data, tmp_path):
    cfg = make_config(
        tiny_model,
        tiny_data,
        val_dataset_folder=str(val_data),
        max_iters=4,
        evaluation_freq=2,
        log_interval=3,
        evaluation_inputs=["Hello", "上海"],
        SYSTEM="You are a test.",
        evaluation_max_new_tokens=4,
    )
    assert train(cfg, tmp_path / "w") == 0
    recs = metrics(tmp_path / "w")
    assert [r["step"] for r in recs] == [2, 3, 4]
    assert "val_loss" in recs[0] and "val_loss" not in recs[1] and recs[2]["val_loss"] > 0
    assert all("loss" in r and "tokens_per_s" in r and "tflops" in r for r in recs)
    gens = [json.loads(x) for x in (tmp_path / "w/generations.jsonl").read_text().splitlines()]
    assert [g["step"] for g in gens] == [0, 0, 2, 2, 4, 4] and gens[1]["input"] == "上海"


def test_gradient_checkpointing_and_workers_change_nothing(tiny_model, tiny_data, tmp_path):
    base = make_config(tiny_model, tiny_data, batch_size=2, accumulative_counts=2, max_iters=2, lr=4e-5)
    assert train(base, tmp_path / "plain") == 0
    assert train(base.replace(gradient_checkpointing=True, dataloader_num_workers=2), tmp_path / "ckpt") == 0
    assert train(base.replace(gradient_checkpointing="selective"), tmp_path / "selective") == 0
    for run in ("ckpt", "selective"):
        assert max_rel_diff(checkpoint_weights(tmp_path / run, 2), checkpoint_weights(tmp_path / "plain", 2)) <= 1e-6
        assert [r["loss"] for r in metrics(tmp_path / run)] == pytest.approx(
            [r["loss"] for r in metrics(tmp_path / "plain")], rel=1e-6
        )


def test_a_checkpoint_of_the_earlier_layout_resumes_where_it_stopped(tiny_model, tiny_data, tmp_path):
    """trainer_state.pt once held the trainer's counters at the top level, beside the sampler,
    scheduler and source counts; such a checkpoint resumes to the same curve as the new layout."""
    import shutil

    from tokentrain.checkpoint.manager import COMPLETE, manifest

    cfg = make_config(tiny_model, tiny_data, max_iters=4, save_steps=2)
    assert train(cfg, tmp_path / "new") == 0
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    shutil.rmtree(tmp_path / "old/checkpoints/step_4")
    (tmp_path / "old/checkpoints/latest").write_text("step_2\n")
    step = tmp_path / "old/checkpoints/step_2"
    parts = torch.load(step / "trainer_state.pt", weights_only=True)
    assert set(parts) == {"trainer", "sampler", "scheduler", "source_tokens"}
    torch.save({**parts.pop("trainer"), **parts}, step / "trainer_state.pt")  # as the earlier version wrote it
    done = json.loads((step / COMPLETE).read_text())
    (step / COMPLETE).write_text(json.dumps(dict(done, files=manifest(step))))

    assert train(cfg, tmp_path / "old", resume="auto") == 0
    assert [r["loss"] for r in metrics(tmp_path / "old")] == [r["loss"] for r in metrics(tmp_path / "new")]
    a, b = checkpoint_weights(tmp_path / "new", 4), checkpoint_weights(tmp_path / "old", 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(tmp_path / "old/checkpoints/step_4/trainer_state.pt", weights_only=True)
    assert state["trainer"]["step"] == 4 and state["sampler"]["consumed"] == 4
