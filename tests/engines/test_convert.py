"""`tokentrain convert pth_to_hf` of every engine's checkpoint, tied and untied embeddings:
the HF folder gives the logits of the run's own WORK_DIR/hf export. (A plain checkpoint of a
tied model used to fail: safetensors stores the shared tensor once.)"""

from __future__ import annotations

import pytest
import torch

from tests.engines.engine_helpers import clean_env, error_lines, logits, tokentrain, write_cfg

pytestmark = pytest.mark.slow
CASES = [
    (True, "plain"),
    (True, "deepspeed_zero1"),
    (True, "deepspeed_zero2"),
    (True, "deepspeed_zero3"),
    (False, "deepspeed_zero1"),
    (False, "deepspeed_zero2"),
]  # untied plain and ZeRO-3 (2 ranks): tests/engines/test_engines.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tokentrain.data.synth import synth_dataset
    from tokentrain.model.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("convert")
    data = root / "data"
    synth_dataset(data, files=1, documents=150, seed=3, mean_length=40, vocab_size=512)
    models = {
        tied: make_tiny_model(
            root / f"model_tied_{tied}", vocab_size=512, hidden_size=32, layers=2, heads=4, tie_word_embeddings=tied
        )
        for tied in (True, False)
    }
    return dict(root=root, data=data, models=models, env=clean_env(TOKENTRAIN_CACHE=str(root / "cache")))


@pytest.mark.parametrize("tied,engine", CASES, ids=[f"{'tied' if t else 'untied'}-{e}" for t, e in CASES])
def test_convert_gives_the_logits_of_the_runs_own_export(setup, tied, engine, tmp_path):
    cfg = write_cfg(tmp_path / "cfg.py", setup["models"][tied], setup["data"], max_iters=2, save_steps=2)
    work = tmp_path / "w"
    flags = [] if engine == "plain" else ["--deepspeed", engine]
    r = tokentrain("train", cfg, "--work-dir", work, *flags, env=setup["env"])
    assert r.returncode == 0, error_lines(r.stderr) or r.stderr[-3000:]
    out = tmp_path / "converted"
    r = tokentrain("convert", "pth_to_hf", cfg, work / "checkpoints" / "step_2", out, env=setup["env"])
    assert r.returncode == 0, error_lines(r.stderr) or r.stderr[-3000:]
    ids = torch.arange(5, 40)[None]
    assert torch.equal(logits(out, ids), logits(work / "hf", ids))
