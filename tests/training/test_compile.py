"""`compile`: the decoder layers compiled train exactly like eager (fp32), through the CLI, on
the tiny demo model and on a GQA + sliding-window family (mistral); the compile time is logged
once; 'auto' leaves a CPU run eager. Compiling takes a minute or more on CPU: slow."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engines.engine_helpers import clean_env, losses, tokentrain, write_cfg
from tests.model.test_varlen_cli import job  # noqa: F401  (the mistral folder and its data)

pytestmark = pytest.mark.slow


def run(model: Path, data: Path, work: Path, **over):
    cfg = write_cfg(work.with_suffix(".py"), model, data, max_iters=3, save_steps=1000, **over)
    r = tokentrain(
        "train", cfg, "--work-dir", work, env=clean_env(TOKENTRAIN_CACHE=str(work.parent / "cache")), timeout=900
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout + r.stderr


@pytest.mark.parametrize("family", ["tiny demo", "mistral"])
def test_compiled_layers_train_like_eager(family, tiny_model, tiny_data, job, tmp_path):  # noqa: F811
    model, data = (tiny_model, tiny_data) if family == "tiny demo" else (job / "mistral", job / "data")
    eager_log = run(model, data, tmp_path / "eager")  # compile = 'auto': eager on CPU
    assert "compile:" not in eager_log
    log = run(model, data, tmp_path / "compiled", compile=True)
    [line] = [x for x in log.splitlines() if "compile: " in x]
    assert "2 decoder blocks compiled in" in line and "(first step" in line
    want, got = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(got) == len(want) == 3
    assert max(abs(a - b) / abs(b) for a, b in zip(got, want)) <= 1e-5, (got, want)
