"""Bad input through the real `tokentrain train`: every config error and every bad-data case
of the data layer gives one line naming the file/line/key, a non-zero documented exit code,
no traceback (without --debug), and nothing a later run would trust (no checkpoint).

The cases and their messages are the table in docs/reliability.md ("Bad input"); a test
below checks that every case here is in it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.data.helpers import BAD_DATASETS, make_bad_dataset
from tokentrain.cli.main import main

from .helpers import checkpoints, clean_env, error_lines, train, write_cfg

DOCS = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"

# The data layer's own catalogue of broken datasets (tests/data/helpers.py), reused as is.
DATA_CASES = BAD_DATASETS
make_bad_data = make_bad_dataset

# case -> (config settings to change, extra CLI args, exit code, regex of the one error line)
CONFIG_CASES = {
    "unknown key": (dict(lerning_rate=1e-3), [], 2, r"run\.py: unknown setting 'lerning_rate'"),
    "misspelled key": (
        dict(max_lenght=64),
        [],
        2,
        r"run\.py: unknown setting 'max_lenght' \(did you mean 'max_length'\?\)",
    ),
    "wrong type": (dict(lr="fast"), [], 2, r"run\.py: lr = 'fast': expected a number"),
    "wrong type (--cfg-options)": (
        {},
        ["--cfg-options", "batch_size=x"],
        2,
        r"--cfg-options batch_size='x': expected an integer",
    ),
    "unknown key (--cfg-options)": ({}, ["--cfg-options", "nokey=1"], 2, r"--cfg-options: unknown key 'nokey'"),
    "missing model folder": (
        dict(pretrained_model_name_or_path="/nonexistent/model"),
        [],
        2,
        r"pretrained_model_name_or_path = /nonexistent/model: model folder does not exist",
    ),
    "model folder without config.json": (
        dict(pretrained_model_name_or_path="{tmp}"),
        [],
        2,
        r"no config\.json in the folder",
    ),
    "missing dataset folder": (
        dict(dataset_folder="/nonexistent/data"),
        [],
        3,
        r"/nonexistent/data: dataset folder does not exist",
    ),
    "max_length = 0": (dict(max_length=0), [], 2, r"run\.py: max_length = 0: must be > 0"),
    "max_length < 0": (dict(max_length=-5), [], 2, r"run\.py: max_length = -5: must be > 0"),
    "batch_size = 0": (dict(batch_size=0), [], 2, r"run\.py: batch_size = 0: must be >= 1"),
    "unknown nan_policy": (
        dict(nan_policy="ignore"),
        [],
        2,
        r"run\.py: nan_policy = 'ignore': must be one of stop, skip",
    ),
    "unknown DeepSpeed preset": (
        {},
        ["--deepspeed", "deepspeed_zero9"],
        2,
        r"--deepspeed 'deepspeed_zero9': unknown preset; did you mean 'deepspeed_zero3'\?",
    ),
    "config syntax error": (None, [], 2, r"run\.py:2: syntax error in config"),
    "missing config file": ("missing", [], 2, r"nowhere\.py: config file not found"),
    "no checkpoint at --resume PATH": (
        {},
        ["--resume", "{tmp}/nowhere"],
        2,
        r"--resume .*nowhere: no checkpoint found there",
    ),
    "more samples per step than data": (dict(max_length=100000), [], 3, r"fewer than one pack of max_length=100000"),
}

TRAIN_PATTERNS = {"rewritten_same_size": r"a\.bin: line \d \(byte \d+\)(:)? .*(not where|where) the meta says"}


def _check_one_line(code, stderr, want_code, pattern, work: Path):
    lines = error_lines(stderr)
    assert code == want_code, (code, stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("tokentrain: error: "), stderr[-3000:]
    assert "Traceback" not in stderr
    assert re.search(pattern, lines[0]), lines[0]
    c = checkpoints(work)
    assert c["latest"] is None and not c["complete"], c  # nothing a later run would resume from
    return lines[0]


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_errors_through_train(case, tiny_model, tiny_data, tmp_path):
    settings, extra, code, pattern = CONFIG_CASES[case]
    cfg = tmp_path / "run.py"
    if settings is None:
        cfg.write_text("import os\nx = = 1\n")
    elif settings == "missing":
        cfg = tmp_path / "nowhere.py"
    else:
        settings = {k: (v.format(tmp=tmp_path) if isinstance(v, str) else v) for k, v in settings.items()}
        write_cfg(cfg, tiny_model, tiny_data, **settings)
    extra = [a.format(tmp=tmp_path) for a in extra]
    work = tmp_path / "w"
    r = train(cfg, "--work-dir", work, *extra, env=clean_env(TOKENTRAIN_CACHE=str(tmp_path / "cache")))
    _check_one_line(r.returncode, r.stderr, code, pattern, work)
    if code == 2:  # config errors come before anything is written
        assert not work.exists()


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_through_train(case, tiny_model, tmp_path, capfd):
    """The data layer's broken datasets, through `train` (in-process: the CLI's own main)."""
    data = tmp_path / "data"
    data.mkdir()
    folder, extra, pattern = make_bad_data(data, case)
    settings = dict(max_length=3, batch_size=1, max_iters=None, max_epochs=1, save_steps=1000)
    if "--no-shuffle" in extra:
        settings["shuffle_before_pack"] = False
    if "--data-order" in extra:
        settings["data_order_path"] = extra[extra.index("--data-order") + 1]
    # Training reads packs in the sampler's order: the first line it meets may be another stale one.
    pattern = TRAIN_PATTERNS.get(case, pattern)
    cfg = write_cfg(tmp_path / "run.py", tiny_model, folder, **settings)
    work = tmp_path / "w"
    code = main(["train", str(cfg), "--work-dir", str(work)])
    err = capfd.readouterr().err
    _check_one_line(code, err, 3, pattern, work)


def test_a_data_error_with_debug_shows_the_traceback(tiny_model, tmp_path):
    cfg = write_cfg(tmp_path / "run.py", tiny_model, tmp_path / "missing")
    r = train(cfg, "--work-dir", tmp_path / "w", "--debug", env=clean_env(TOKENTRAIN_CACHE=str(tmp_path / "cache")))
    assert r.returncode != 0 and "Traceback" in r.stderr and "dataset folder does not exist" in r.stderr


def test_every_case_is_in_the_docs_table():
    text = DOCS.read_text()
    table = text[text.index("## Bad input") :]
    for case in [*CONFIG_CASES, *DATA_CASES, "token id >= vocabulary size", "data rewritten during training"]:
        assert f"| {case} |" in table, case
