"""`data stats` / `data show` given a training config: a mixture's effective epochs, and the
sample training sees (the config's seed, 1024 by default, not 0)."""

from __future__ import annotations

import json

import numpy as np

from tokentrain.cli.main import main
from tokentrain.config.loader import load_config
from tokentrain.data.dataset import DataSettings, build_dataset, build_train_data

from .helpers import write_bin


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _data(root, name, docs, base):
    rng = np.random.default_rng(base)
    write_bin(root / name / "p.bin", [base + rng.integers(1, 99, int(rng.integers(4, 30))) for _ in range(docs)])
    return root / name


def _config(tmp_path, **over):
    settings = dict(
        pretrained_model_name_or_path="unused",
        datasets=[
            dict(folder=str(_data(tmp_path, "web", 200, 100)), weight=3),
            dict(folder=str(_data(tmp_path, "code", 50, 200)), weight=1),
        ],
        max_length=16,
        batch_size=2,
        accumulative_counts=2,
        max_iters=100,
    )
    settings.update(over)
    p = tmp_path / "cfg.py"
    p.write_text("".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    return p


def test_stats_of_a_mixture_gives_effective_epochs_at_the_planned_steps(tmp_path, capsys):
    cfg = _config(tmp_path)
    code, out, _ = run(capsys, "data", "stats", "--config", cfg, "--world-size", 2, "--json")
    assert code == 0
    st = json.loads(out)
    assert st["planned_steps"] == 100 and st["global_batch"] == 8
    web, code_ = st["sources"]
    assert (web["name"], web["weight"], code_["weight"]) == ("web", 0.75, 0.25)
    assert web["planned_samples"] + code_["planned_samples"] == 800
    assert code_["planned_samples"] == 200 and code_["epochs"] == 200 / code_["samples"] > 1
    code, text, _ = run(capsys, "data", "stats", "--config", cfg)
    assert code == 0 and "over-sampled" in text.splitlines()[-1] and text.splitlines()[-1].split()[0] == "code"


def test_stats_of_a_config_with_one_folder_is_the_folder_stats(tmp_path, capsys):
    folder = _data(tmp_path, "one", 20, 100)
    cfg = _config(tmp_path, datasets=[], dataset_folder=str(folder))
    assert (
        run(capsys, "data", "stats", "--config", cfg, "--json")[1] == run(capsys, "data", "stats", folder, "--json")[1]
    )


def test_show_with_the_config_is_what_training_reads(tmp_path, capsys):
    cfg = _config(tmp_path)
    mix, _ = build_train_data(load_config(cfg))
    for i in (0, 7, 500):  # 500: past one mixture epoch, the stream goes on
        code, out, _ = run(capsys, "data", "show", "--config", cfg, "--index", i, "--json")
        got = json.loads(out)
        assert code == 0 and got["input_ids"] == mix[i]["input_ids"].tolist() and got["source"] == mix[i]["source"]


def test_show_shuffles_with_the_training_seed_by_default(tmp_path, capsys):
    folder = _data(tmp_path, "one", 60, 100)
    got = json.loads(run(capsys, "data", "show", folder, "--max-length", 8, "--index", 3, "--json")[1])
    assert (
        got["input_ids"] == build_dataset(DataSettings(str(folder), max_length=8, seed=1024))[3]["input_ids"].tolist()
    )
    assert got["input_ids"] != build_dataset(DataSettings(str(folder), max_length=8, seed=0))[3]["input_ids"].tolist()
    cfg = _config(tmp_path, datasets=[], dataset_folder=str(folder), max_length=8)
    via_cfg = json.loads(run(capsys, "data", "show", "--config", cfg, "--index", 3, "--json")[1])
    assert via_cfg["input_ids"] == got["input_ids"]


def test_show_without_folder_or_config_is_a_usage_error(capsys):
    code, _, err = run(capsys, "data", "show", "--index", 1)
    assert code == 2 and "give DIR and --max-length, or --config CFG" in err


def test_cfg_options_override_the_config_as_in_train(tmp_path, capsys):
    """`--cfg-options` works on `data stats` / `data show` as on `train` (max_iters, max_length ...)."""
    cfg = _config(tmp_path)
    code, out, _ = run(capsys, "data", "stats", "--config", cfg, "--cfg-options", "max_iters=10", "--json")
    assert code == 0 and json.loads(out)["planned_steps"] == 10
    code, out, _ = run(capsys, "data", "show", "--config", cfg, "--cfg-options", "max_length=8", "--json")
    assert code == 0 and len(json.loads(out)["input_ids"]) == 8
    code, _, err = run(capsys, "data", "stats", "--config", cfg, "--cfg-options", "max_lenght=8")
    assert code == 2 and "max_lenght" in err and "max_length" in err
    code, _, err = run(capsys, "data", "stats", str(tmp_path / "web"), "--cfg-options", "max_iters=10")
    assert code == 2 and "--cfg-options needs --config" in err
