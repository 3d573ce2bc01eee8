"""Issue 23, items 5, 6 and 8 through the real CLI: an XTuner config's unknown keys in one
error, `dataset_folder = None` beside a mixture (and the templates' mixture example), and a
`max_length` beyond the model's positions (a warning, or a refusal for learned positions)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

from tests.reliability.helpers import TT, clean_env, error_lines, one_error_line, train, write_cfg


def test_xtuner_keys_are_listed_at_once_with_what_tokentrain_does_instead(tmp_path, tiny_model, tiny_data):
    cfg = write_cfg(
        tmp_path / "run.py",
        tiny_model,
        tiny_data,
        optim_type="AdamW",
        resume=False,
        warmup_ratio=0.03,
        sequence_parallel_size=1,
        max_lenght=64,
    )
    line = one_error_line(train(cfg, "--work-dir", tmp_path / "w"), 2, r"run\.py: 5 unknown settings: ")
    assert "'optim_type' (tokentrain always uses AdamW: set lr, betas, weight_decay" in line
    assert "'resume' (resume with the `--resume auto` flag" in line
    assert "'warmup_ratio' (did you mean 'warm_up_ratio'?)" in line
    assert "'sequence_parallel_size' (no sequence parallelism" in line
    assert "'max_lenght' (did you mean 'max_length'?)" in line
    assert "export_dtype" not in line and "resume_ignore" not in line  # the old fuzzy hints
    assert not (tmp_path / "w").exists()


def _copy_tiny_demo(tmp_path) -> str:
    r = subprocess.run([*TT, "copy-cfg", "tiny_demo", tmp_path], env=clean_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return (tmp_path / "tiny_demo_copy.py").read_text()


def test_the_template_shows_the_mixture_form_and_it_trains_with_dataset_folder_none(tmp_path, tiny_model, tiny_data):
    text = _copy_tiny_demo(tmp_path)
    lines = text.splitlines()
    at = next(i for i, x in enumerate(lines) if x.startswith("dataset_folder = "))
    assert "dataset_folder = None" in lines[at + 1] and lines[at + 2] == "# datasets = ["
    # What a user does: dataset_folder = None, uncomment the example, point it at their folders.
    text = text.replace(lines[at], "dataset_folder = None")
    text = re.sub(r"^# (datasets = \[|    dict\(|\])", r"\1", text, flags=re.M)
    text = text.replace("/path/to/web", str(tiny_data)).replace("/path/to/code", str(tiny_data))
    text = text.replace("'demo/tiny-llama'", repr(str(tiny_model)))
    cfg = tmp_path / "mix.py"
    cfg.write_text(text)
    over = ["max_iters=2", "max_length=128", "dataloader_num_workers=0", "tensorboard=False", "evaluation_inputs=[]"]
    r = train(cfg, "--work-dir", tmp_path / "w", "--cfg-options", *over)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "w" / "hf").is_dir()


def _model_with(tmp_path, tiny_model, name: str, **config) -> str:
    folder = tmp_path / name
    shutil.copytree(tiny_model, folder)
    p = folder / "config.json"
    p.write_text(json.dumps(dict(json.loads(p.read_text()), **config)))
    return str(folder)


def test_max_length_beyond_rotary_positions_warns_once_with_both_numbers(tmp_path, tiny_model, tiny_data):
    model = _model_with(tmp_path, tiny_model, "short", max_position_embeddings=64)
    r = train(write_cfg(tmp_path / "run.py", model, tiny_data, max_iters=1), "--work-dir", tmp_path / "w")
    assert r.returncode == 0 and not error_lines(r.stderr), r.stderr[-3000:]
    (warn,) = [x for x in r.stderr.splitlines() if "beyond the model's" in x]
    assert f"max_length = 128 is beyond the model's 64 positions (max_position_embeddings in {model}" in warn
    assert "no rope scaling" in warn


def test_the_warning_names_the_rope_scaling_that_extrapolates(tmp_path, tiny_model, tiny_data):
    scaling = {"rope_type": "linear", "factor": 2.0}
    model = _model_with(tmp_path, tiny_model, "scaled", max_position_embeddings=64, rope_scaling=scaling)
    r = train(write_cfg(tmp_path / "run.py", model, tiny_data, max_iters=1), "--work-dir", tmp_path / "w")
    assert r.returncode == 0, r.stderr[-3000:]
    (warn,) = [x for x in r.stderr.splitlines() if "beyond the model's" in x]
    assert "64 positions" in warn and "rope scaling (linear, factor 2.0)" in warn


def test_max_length_beyond_learned_positions_is_refused_before_the_model_loads(tmp_path, tiny_model, tiny_data):
    from transformers import GPT2Config

    folder = tmp_path / "gpt2-short"
    shutil.copytree(tiny_model, folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    GPT2Config(vocab_size=512, n_positions=64, n_embd=32, n_layer=1, n_head=2).save_pretrained(folder)
    r = train(write_cfg(tmp_path / "run.py", folder, tiny_data), "--work-dir", tmp_path / "w")
    line = one_error_line(r, 2, r"max_length = 128 is beyond the model's 64 positions \(n_positions in ")
    assert str(folder) in line and "cannot extrapolate" in line


def test_an_xtuner_key_holding_a_class_is_not_silently_dropped(tmp_path, tiny_model, tiny_data):
    cfg = write_cfg(tmp_path / "run.py", tiny_model, tiny_data)
    cfg.write_text("from torch.optim import AdamW\n" + cfg.read_text() + "optim_type = AdamW\n")
    one_error_line(train(cfg, "--work-dir", tmp_path / "w"), 2, r"unknown setting 'optim_type' \(tokentrain always")


def test_an_xtuner_import_says_to_remove_it(tmp_path, tiny_model, tiny_data):
    cfg = write_cfg(tmp_path / "run.py", tiny_model, tiny_data)
    cfg.write_text("from xtuner.utils import PROMPT_TEMPLATE\n" + cfg.read_text())
    one_error_line(
        train(cfg, "--work-dir", tmp_path / "w"), 2, r"No module named 'xtuner'; .*remove the XTuner imports"
    )
