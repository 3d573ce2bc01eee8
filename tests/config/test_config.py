"""Config files: loading, validation with one-line errors, --cfg-options, templates."""

from __future__ import annotations

import pytest

from tests.helpers import write_config
from tokentrain.cli.main import main
from tokentrain.config.loader import load_config, parse_override
from tokentrain.config.templates import copy_template, list_templates
from tokentrain.errors import ConfigError

REQUIRED = dict(pretrained_model_name_or_path="/m", dataset_folder="/d")


def test_loads_settings_and_ignores_imports_and_helpers(tmp_path):
    p = tmp_path / "c.py"
    p.write_text(
        "import os\nfrom pathlib import Path\ndef helper(x):\n    return x\n"
        "pretrained_model_name_or_path = '/m'\ndataset_folder = str(Path('/d'))\n"
        "_private = 3\nbetas = [0.8, 0.9]\nmax_norm = 1\nbatch_size = 4.0\nSYSTEM = 'be nice'\n"
    )
    cfg = load_config(p)
    assert cfg.dataset_folder == "/d" and cfg.betas == (0.8, 0.9) and cfg.max_norm == 1.0
    assert isinstance(cfg.batch_size, int) and cfg.batch_size == 4 and cfg.SYSTEM == "be nice"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("lerning_rate = 0.1\n", "unknown setting 'lerning_rate'"),
        ("accumulative_count = 2\n", "did you mean 'accumulative_counts'"),
        ("system = 'x'\n", "did you mean 'SYSTEM'"),
        ("batch_size = '4'\n", "batch_size = '4': expected an integer"),
        ("pack_to_max_length = 1\n", "expected True or False"),
        ("betas = (0.9,)\n", "expected a tuple of 2 numbers"),
        ("batch_size = 0\n", "batch_size = 0: must be >= 1"),
        ("save_total_limit = 0\n", "-1 to keep every checkpoint"),
        ("warm_up_ratio = 1.5\n", "warm_up_ratio"),
        ("dtype = 'fp8'\n", "dtype = 'fp8': must be one of"),
        ("evaluation_inputs = 'hi'\n", "expected a list of strings"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_file_and_key(tmp_path, text, needle):
    p = write_config(tmp_path / "c.py", **REQUIRED)
    p.write_text(p.read_text() + text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert needle in msg and str(p) in msg and "\n" not in msg


def test_missing_required_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="dataset_folder = '': must be set"):
        load_config(write_config(tmp_path / "a.py", pretrained_model_name_or_path="/m"))
    (tmp_path / "b.py").write_text("x = (\n")
    with pytest.raises(ConfigError, match="syntax error"):
        load_config(tmp_path / "b.py")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.py")


def test_cfg_options_are_coerced_to_the_key_type(tmp_path):
    p = write_config(tmp_path / "c.py", **REQUIRED)
    cfg = load_config(
        p,
        [
            "lr=3e-4",
            "batch_size=8",
            "pack_to_max_length=false",
            "betas=0.8,0.99",
            "max_iters=1e2",
            "val_dataset_folder=/v",
            "evaluation_inputs=['a b', 'c']",
            "use_varlen_attn=None",
            "dtype=bf16",
            "SYSTEM=hello world",
        ],
    )
    assert cfg.lr == 3e-4 and cfg.batch_size == 8 and cfg.pack_to_max_length is False
    assert cfg.betas == (0.8, 0.99) and cfg.max_iters == 100 and cfg.val_dataset_folder == "/v"
    assert cfg.evaluation_inputs == ["a b", "c"] and cfg.use_varlen_attn is None and cfg.dtype == "bfloat16"
    assert cfg.SYSTEM == "hello world"
    assert load_config(p, ["use_varlen_attn=true"]).use_varlen_attn is True
    with pytest.raises(ConfigError, match="did you mean 'max_iters'"):
        parse_override("max_iter=3")
    with pytest.raises(ConfigError, match="batch_size='x': expected an integer"):
        parse_override("batch_size=x")
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("batch_size")


def test_the_keys_that_take_a_boolean_or_a_word(tmp_path):
    """compile ('auto' | True | False) and gradient_checkpointing (False | True | 'selective'):
    a boolean word is the boolean, another word the string, and only the listed ones are kept."""
    p = write_config(tmp_path / "c.py", **REQUIRED)
    assert load_config(p).compile == "auto" and load_config(p).gradient_checkpointing is False
    cfg = load_config(p, ["compile=true", "gradient_checkpointing=selective"])
    assert cfg.compile is True and cfg.gradient_checkpointing == "selective"
    assert load_config(p, ["compile=off"]).compile is False
    with pytest.raises(ConfigError, match="compile = 'fast': must be 'auto', True or False"):
        load_config(p, ["compile=fast"])
    with pytest.raises(ConfigError, match="gradient_checkpointing = 'full': must be False, True or 'selective'"):
        load_config(write_config(tmp_path / "g.py", **REQUIRED, gradient_checkpointing="full"))
    with pytest.raises(ConfigError, match="compile = 1: expected True or False or a string"):
        load_config(write_config(tmp_path / "n.py", **REQUIRED, compile=1))


def test_templates_list_copy_and_load(tmp_path):
    names = list_templates()
    for must in ("internlm_7b_full_intern_repo_dataset_template", "internlm2_7b_w_tokenized_dataset", "tiny_demo"):
        assert must in names
    assert any("llama" in n and "tiny" not in n for n in names) and any("qwen2" in n for n in names)
    assert list_templates("internlm") == [n for n in names if "internlm" in n]
    assert list_templates("*demo") == ["tiny_demo"]
    for name in names:
        cfg = load_config(copy_template(name, tmp_path))
        assert cfg.pack_to_max_length
    seed = load_config(tmp_path / "internlm_7b_full_intern_repo_dataset_template_copy.py")
    assert (seed.max_length, seed.lr, seed.betas, seed.warm_up_ratio, seed.save_total_limit) == (
        2048,
        4e-5,
        (0.9, 0.95),
        0.025,
        2,
    )
    assert seed.pretrained_model_name_or_path == "internlm/internlm-7b"


def test_list_and_copy_cfg_commands(tmp_path, capsys):
    assert main(["list-cfg", "-p", "qwen"]) == 0
    assert "qwen2" in capsys.readouterr().out
    assert main(["copy-cfg", "tiny_demo", str(tmp_path)]) == 0
    assert (tmp_path / "tiny_demo_copy.py").is_file()
    assert main(["copy-cfg", "tiny_dmeo", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'tiny_demo'" in err and len(err.strip().splitlines()) == 1


def test_train_rejects_bad_config_before_heavy_work(tmp_path, capsys):
    p = write_config(tmp_path / "c.py", **REQUIRED, max_lenght=5)
    assert main(["train", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert "did you mean 'max_length'" in err and len(err.splitlines()) == 1
    assert main(["train", str(write_config(tmp_path / "d.py", **REQUIRED)), "--cfg-options", "lr=abc"]) == 2


def test_dataset_folder_none_is_not_set_beside_a_mixture(tmp_path):
    mix = [dict(folder="/a", weight=1.0)]
    p = write_config(tmp_path / "c.py", pretrained_model_name_or_path="/m", dataset_folder=None, datasets=mix)
    assert load_config(p).dataset_folder == ""
    both = write_config(tmp_path / "b.py", **REQUIRED, datasets=mix)
    with pytest.raises(ConfigError, match=r"not both \(dataset_folder = None for a mixture\)"):
        load_config(both)
    assert load_config(both, ["dataset_folder=None"]).datasets == mix
    with pytest.raises(ConfigError, match="dataset_folder = '': must be set"):
        load_config(write_config(tmp_path / "n.py", pretrained_model_name_or_path="/m", dataset_folder=None))
