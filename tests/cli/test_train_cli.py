"""The real command line, end to end: train, preempt with SIGTERM, resume, export, plot, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import checkpoint_weights, metrics, write_config
from tokentrain.cli.main import main

TT = [sys.executable, "-m", "tokentrain"]


def _cfg(path: Path, model, data, **over) -> Path:
    settings = dict(
        pretrained_model_name_or_path=str(model),
        dataset_folder=str(data),
        max_length=128,
        batch_size=2,
        accumulative_counts=1,
        dataloader_num_workers=2,
        max_iters=150,
        lr=1e-3,
        warm_up_ratio=0.1,
        save_steps=1000,
        save_total_limit=2,
        evaluation_freq=1000,
        evaluation_inputs=["Hello"],
        evaluation_max_new_tokens=4,
        log_interval=1,
        dtype="float32",
        seed=3,
    )
    settings.update(over)
    return write_config(path, **settings)


def _env(tmp_path):
    return dict(os.environ, TOKENTRAIN_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")


def test_sigterm_checkpoints_exits_75_and_resume_is_bit_identical(tiny_model, tiny_data, tmp_path):
    cfg = _cfg(tmp_path / "run.py", tiny_model, tiny_data)
    env = _env(tmp_path)
    full = subprocess.run(
        [*TT, "train", str(cfg), "--work-dir", str(tmp_path / "a")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert full.returncode == 0, full.stderr[-2000:]

    work = tmp_path / "b"
    proc = subprocess.Popen(
        [*TT, "train", str(cfg), "--work-dir", str(work)], env=env, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if (work / "metrics.jsonl").is_file() and len((work / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 75, err[-2000:]
    assert "stopped by SIGTERM" in err
    stopped = int((work / "checkpoints/latest").read_text().strip().split("_")[1])
    assert 3 <= stopped < 150
    assert not (work / "hf").exists()

    resumed = subprocess.run(
        [*TT, "train", str(cfg), "--work-dir", str(work), "--resume", "auto"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {work / 'checkpoints' / f'step_{stopped}'} at step {stopped}" in resumed.stderr

    a, b = metrics(tmp_path / "a"), metrics(work)
    assert [r["step"] for r in b] == list(range(1, 151))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert a[-1]["epoch"] > 2  # crossed epochs (63 steps each)
    wa, wb = checkpoint_weights(tmp_path / "a", 150), checkpoint_weights(work, 150)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    # The Hugging Face export loads with the Auto classes and gives the trained model's logits.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(work / "hf")
    ref = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ref.load_state_dict(wb, strict=True)
    ids = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert AutoTokenizer.from_pretrained(work / "hf")("Hello").input_ids
    assert {p.name for p in (work / "checkpoints").glob("step_*")} == {f"step_{stopped}", "step_150"}

    # Every line of metrics.jsonl is one JSON object with step and loss; TensorBoard has events.
    assert all(
        {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops", "target_tokens", "epoch"} <= r.keys() for r in b
    )
    assert list((work / "tensorboard").glob("events.*"))
    out = work / "metrics.png"
    assert main(["plot", str(work)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failures_exit_nonzero_with_one_line(tiny_model, tiny_data, tmp_path):
    env = _env(tmp_path)

    def run(*args):
        r = subprocess.run([*TT, "train", *args], env=env, capture_output=True, text=True, timeout=120)
        lines = [x for x in r.stderr.splitlines() if x.startswith("tokentrain:")]
        return r.returncode, lines, r.stderr

    code, lines, _ = run(str(_cfg(tmp_path / "a.py", tiny_model, tmp_path / "missing")))
    assert code == 3 and len(lines) == 1 and "dataset folder does not exist" in lines[0]
    code, lines, _ = run(str(_cfg(tmp_path / "b.py", tmp_path / "no_model", tiny_data)))
    assert code == 2 and len(lines) == 1 and "cannot load the tokenizer" in lines[0]
    code, lines, _ = run(str(_cfg(tmp_path / "c.py", tiny_model, tiny_data)), "--resume", str(tmp_path / "nowhere"))
    assert code == 2 and "no checkpoint found" in lines[0]
    code, lines, _ = run(str(_cfg(tmp_path / "d.py", tiny_model, tiny_data, max_length=100000)))
    assert code == 3 and "fewer than one pack" in lines[0]
    code, _, err = run(str(_cfg(tmp_path / "e.py", tiny_model, tiny_data, max_length=100000)), "--debug")
    assert code != 0 and "Traceback" in err


@pytest.mark.slow
def test_every_template_trains_with_only_the_paths_changed(tiny_model, tmp_path, monkeypatch):
    """Copy each shipped template, change the two PART 1 paths, train it (one epoch of a small set)."""
    import re

    from tokentrain.config.templates import list_templates
    from tokentrain.data.synth import synth_dataset

    data = tmp_path / "data"
    synth_dataset(data, files=2, documents=30, seed=5, mean_length=200, vocab_size=512)  # 2 packs of 2048
    monkeypatch.chdir(tmp_path)
    for name in list_templates():
        assert main(["copy-cfg", name, str(tmp_path / "cfgs")]) == 0
        path = tmp_path / "cfgs" / f"{name}_copy.py"
        text = path.read_text()
        text = re.sub(
            r"^pretrained_model_name_or_path = .*$",
            f"pretrained_model_name_or_path = {str(tiny_model)!r}",
            text,
            flags=re.M,
        )
        text = re.sub(r"^dataset_folder = .*$", f"dataset_folder = {str(data)!r}", text, flags=re.M)
        path.write_text(text)
        # tiny_demo's 300 steps (the demo's learning run) are the demo's business: 10 prove it trains.
        extra = ["--cfg-options", "max_iters=10"] if "max_iters = 300" in text else []
        assert main(["train", str(path), "--work-dir", str(tmp_path / name), *extra]) == 0, name
        recs = metrics(tmp_path / name)
        assert (
            recs and recs[-1]["step"] == recs[-1]["total_steps"] and (tmp_path / name / "hf" / "config.json").is_file()
        )
        assert json.loads((tmp_path / name / "generations.jsonl").read_text().splitlines()[0])["step"] == 0


def test_module_entry_accepts_and_ignores_local_rank(tiny_model, tiny_data, tmp_path, monkeypatch):
    """`python -m tokentrain.train CFG --local_rank N` (torch.distributed.launch style)."""
    from tokentrain.train import main as module_main
    from tokentrain.train import strip_local_rank

    assert strip_local_rank(["c.py", "--local_rank", "3", "--seed", "1"]) == (["c.py", "--seed", "1"], "3")
    assert strip_local_rank(["--local-rank=2", "c.py"]) == (["c.py"], "2")
    monkeypatch.setenv("LOCAL_RANK", "0")  # the env takes precedence over the flag
    cfg = _cfg(tmp_path / "m.py", tiny_model, tiny_data, max_iters=2, dataloader_num_workers=0, evaluation_inputs=[])
    assert module_main([str(cfg), "--local_rank", "5", "--work-dir", str(tmp_path / "w")]) == 0
    import os as _os

    assert _os.environ["LOCAL_RANK"] == "0" and [r["step"] for r in metrics(tmp_path / "w")] == [1, 2]
