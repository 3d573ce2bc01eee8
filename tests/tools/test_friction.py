"""The friction list of issue 12, each through the real CLI: the demo model outside the
checkout, --deepspeed without the extra, convert's dtype / flags / missing folder, hints for
other trainers' names, --cfg-options blamed on itself, optional plot and TensorBoard."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokentrain.cli.main import main

TT = [sys.executable, "-m", "tokentrain"]
ROOT = Path(__file__).resolve().parents[2]


def _run(*argv, cwd=None, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="0")
    return subprocess.run([*TT, *map(str, argv)], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def _errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("tokentrain: error:")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-step training run: (config, work dir)."""
    from tokentrain.data.synth import synth_dataset
    from tokentrain.model.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("friction")
    model = make_tiny_model(root / "m", vocab_size=512, hidden_size=32, layers=2, heads=4)
    synth_dataset(root / "d", files=1, documents=60, seed=1, mean_length=40, vocab_size=512)
    cfg = root / "c.py"
    settings = dict(pretrained_model_name_or_path=str(model), dataset_folder=str(root / "d"), max_length=64,
                    max_iters=1, tensorboard=False, dtype="float32", evaluation_inputs=[])  # fmt: skip
    cfg.write_text("".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    r = _run("train", cfg, "--work-dir", root / "w", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return cfg, root / "w"


def test_demo_config_outside_the_checkout_points_to_the_demo_verb(tmp_path):
    assert main(["copy-cfg", "tiny_demo", str(tmp_path)]) == 0
    (cfg,) = tmp_path.glob("tiny_demo*.py")
    r = _run("train", cfg.name, cwd=tmp_path, timeout=60)  # no hub retries: refused at once
    (err,) = _errors(r.stderr)
    assert r.returncode == 2 and "demo/tiny-llama (= " in err and "no such model folder" in err
    assert "tokentrain demo DIR" in err
    (tmp_path / "in.jsonl").write_text('{"text": "hello"}\n')
    r = _run("tokenize", "in.jsonl", "--tokenizer", "demo/tiny-llama", "--out", "o", cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "tokentrain demo DIR" in _errors(r.stderr)[0]
    # Made as the error says, the demo is the checkout's: the same model files, data a run reads.
    r = _run("demo", "d", cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and "cd d && tokentrain train tiny_demo_copy.py" in r.stdout, r.stderr[-1500:]
    shipped = ROOT / "demo" / "tiny-llama"
    assert sorted(p.name for p in (tmp_path / "d/demo/tiny-llama").iterdir()) == sorted(
        p.name for p in shipped.iterdir()
    )
    assert (tmp_path / "d/demo/tiny-llama/config.json").read_bytes() == (shipped / "config.json").read_bytes()
    assert _run("data", "check", "demo_out/data", cwd=tmp_path / "d").returncode == 0
    r = _run("demo", "d", cwd=tmp_path)  # an earlier demo is not replaced without --force
    assert r.returncode == 2 and "exists" in _errors(r.stderr)[0] and "--force" in _errors(r.stderr)[0]
    assert _run("demo", "d", "--force", cwd=tmp_path, timeout=120).returncode == 0


def test_deepspeed_without_the_extra_is_a_usage_error_naming_it(trained):
    cfg, _ = trained
    code = (
        "import sys; sys.modules['deepspeed'] = None\n"  # as if the extra were not installed
        "from tokentrain.cli.main import main\n"
        f"raise SystemExit(main(['train', {str(cfg)!r}, '--deepspeed', 'deepspeed_zero1', '--work-dir', 'unused']))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    (err,) = _errors(r.stderr)
    assert r.returncode == 2 and "DeepSpeed is not installed; pip install 'tokentrain[deepspeed]'" in err
    assert "internal error" not in r.stderr


def test_convert_bfloat16_records_its_dtype_and_flags_do_what_they_say(trained, tmp_path):
    cfg, work = trained
    r = _run("convert", "pth_to_hf", cfg, work, tmp_path / "o", "--dtype", "bfloat16", "--safe-serialization",
             timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "o" / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(tmp_path / "o" / "model.safetensors").values()} == {torch.bfloat16}
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "o", dtype="auto").dtype == torch.bfloat16
    r = _run("convert", "pth_to_hf", cfg, work, tmp_path / "o2", "--no-safe-serialization")
    assert r.returncode == 2 and "--no-safe-serialization: not supported" in _errors(r.stderr)[0]


def test_convert_on_a_missing_or_empty_folder_does_not_speak_of_resume(trained, tmp_path):
    cfg, _ = trained
    r = _run("convert", "pth_to_hf", cfg, tmp_path / "nope", tmp_path / "o")
    (err,) = _errors(r.stderr)
    assert r.returncode == 2 and "nope: no such folder" in err and "--resume" not in err
    (tmp_path / "empty").mkdir()
    r = _run("convert", "pth_to_hf", cfg, tmp_path / "empty", tmp_path / "o")
    (err,) = _errors(r.stderr)
    assert r.returncode == 2 and "no checkpoint found" in err and "resume" not in err and "'auto'" not in err


def _cfg(tmp_path, **extra) -> Path:
    p = tmp_path / "cfg.py"
    settings = dict(pretrained_model_name_or_path="m", dataset_folder="d", **extra)
    p.write_text("".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    return p


@pytest.mark.parametrize(
    "name, ours",
    [("learning_rate", "lr"), ("gradient_accumulation_steps", "accumulative_counts"), ("max_steps", "max_iters")],
)
def test_other_trainers_names_get_a_hint(tmp_path, capsys, name, ours):
    assert main(["train", str(_cfg(tmp_path, **{name: 1})), "--work-dir", str(tmp_path / "w")]) == 2
    assert f"unknown setting {name!r} (did you mean {ours!r}?)" in capsys.readouterr().err


def test_a_bad_cfg_options_value_is_blamed_on_the_option_not_the_file(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    assert main(["train", str(cfg), "--cfg-options", "max_length=0", "--work-dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "error: --cfg-options: max_length = 0: must be > 0" in err and str(cfg) not in err
    bad = _cfg(tmp_path, max_length=0)
    assert main(["train", str(bad), "--work-dir", str(tmp_path / "w")]) == 2
    assert f"error: {bad}: max_length = 0: must be > 0" in capsys.readouterr().err


def test_plot_without_matplotlib_says_which_extra(trained, monkeypatch, capsys):
    _, work = trained
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["plot", str(work)]) == 2
    assert "tokentrain plot needs matplotlib: pip install 'tokentrain[plot]'" in capsys.readouterr().err


def test_tensorboard_asked_for_but_missing_warns_once_and_training_logs_on(tmp_path, monkeypatch, caplog):
    from tokentrain.metrics.logger import MetricsLogger

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    caplog.set_level(logging.WARNING, logger="tokentrain")
    m = MetricsLogger(tmp_path, True, total_steps=2, start_step=0, tensorboard=True)
    m.write({"step": 1, "loss": 1.0}, echo=False)
    m.close()
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "TensorBoard disabled" in warning and "tokentrain[tensorboard]" in warning
    assert (tmp_path / "metrics.jsonl").read_text().strip() == '{"step": 1, "loss": 1.0}'
