"""Every engine builds the model with the one builder (`model/lm.py:load_model`; FSDP2 only
adds its shard step as a hook), so a model folder it cannot read fails the same way under
each: through the real CLI, one line (exit 2, no traceback) naming what is wrong. Before,
`--engine fsdp2` let a config-only folder's unknown model_type out as an internal error."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.reliability.helpers import one_error_line

from .engine_helpers import clean_env, tokentrain, write_cfg


def _copy(model: Path, dst: Path, weights: bool = True) -> Path:
    shutil.copytree(model, dst)
    if not weights:  # config only: the path that builds with from_config (FSDP2: on the meta device)
        for f in dst.glob("*.safetensors"):
            f.unlink()
    return dst


def not_json(model: Path, dst: Path) -> Path:
    (_copy(model, dst, weights=False) / "config.json").write_text("{not json")
    return dst


def unknown_model_type(model: Path, dst: Path) -> Path:
    (_copy(model, dst, weights=False) / "config.json").write_text('{"model_type": "nosuch"}')
    return dst


def truncated_weights(model: Path, dst: Path) -> Path:
    w = _copy(model, dst) / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    return dst


# case -> (how to break the folder, regex of the one error line)
CASES = {
    "config.json not JSON": (not_json, r"config file at '.*/config\.json' is not a valid JSON file"),
    "unknown model_type": (unknown_model_type, r"cannot read its config\.json: .*model type `nosuch`"),
    "truncated weights": (truncated_weights, r"cannot load the model: .*deserializing header"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_broken_model_folder_is_the_same_one_line_error_on_every_engine(case, tiny_model, tiny_data, tmp_path):
    breaks, pattern = CASES[case]
    folder = breaks(tiny_model, tmp_path / "model")
    cfg = write_cfg(tmp_path / "run.py", folder, tiny_data)
    env = clean_env(TOKENTRAIN_CACHE=str(tmp_path / "cache"))
    lines = {}
    for name, extra in {"default": [], "fsdp2": ["--engine", "fsdp2"]}.items():
        r = tokentrain("train", cfg, "--work-dir", tmp_path / name, *extra, env=env)
        lines[name] = one_error_line(r, 2, rf"pretrained_model_name_or_path = '{folder}': .*{pattern}")
    assert lines["default"] == lines["fsdp2"]
