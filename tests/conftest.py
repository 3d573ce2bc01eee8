"""Fixtures shared by every test folder: an isolated index cache per test, a tiny Llama
folder (random weights, offline byte-level tokenizer), tiny synthetic InternLM-format
datasets (built once per session), a real one-node Slurm; and the markers the folders get.

Markers (all run in CI; `make test-fast` / `make check` leave some out):
``slurm`` -- a test that uses the `slurm_cluster` fixture; ``deepspeed`` -- a test that
builds a DeepSpeed engine (its id names deepspeed or a ZeRO stage); ``distributed`` and
``slow`` -- set by the test modules themselves.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 512
_DEEPSPEED = re.compile(r"deepspeed|zero[123]|ZeRO", re.IGNORECASE)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        # Slurm tests (the fixture, or `srun` cases that ask for it at run time) share one
        # slurmctld: under `pytest -n 2 --dist loadgroup` they all run in one worker, in turn.
        if "slurm_cluster" in getattr(item, "fixturenames", ()) or "srun" in item.nodeid:
            item.add_marker(pytest.mark.slurm)
            item.add_marker(pytest.mark.xdist_group("slurm"))
        elif item.get_closest_marker("xdist_group") is None and _uses_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
        if _DEEPSPEED.search(item.nodeid):
            item.add_marker(pytest.mark.deepspeed)


def _uses_module_fixture(item) -> bool:
    """A module-scoped fixture here is an expensive shared run. Under `--dist loadgroup` the
    module's tests would be spread over both workers, each computing it (and again whenever a
    worker's queue leaves the module and comes back), so they get one group: one worker, in a row."""
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    return any(d and d[-1].scope == "module" for d in defs.values())


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test its own TOKENTRAIN_CACHE, and no fault injection from the outside."""
    cache = tmp_path_factory.mktemp("tt_cache")
    monkeypatch.setenv("TOKENTRAIN_CACHE", str(cache))
    monkeypatch.delenv("TOKENTRAIN_FAULT_INJECT", raising=False)
    return cache


@pytest.fixture(autouse=True)
def _torch_load_as_asked():
    """`train`/`convert` run in-process force weights-only loading for the whole process
    (checkpoint/safety.weights_only_everywhere, by design); a later test in the same worker --
    one that crafts a pickle with ``weights_only=False`` -- must not inherit it."""
    from tokentrain.checkpoint.safety import FORCE, FORCE_NOT

    for name in (FORCE, FORCE_NOT):
        os.environ.pop(name, None)
    yield
    os.environ.pop(FORCE, None)


@pytest.fixture(scope="session", autouse=True)
def _quiet_and_small():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from tokentrain.model.tiny import make_tiny_model

    return make_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny-llama", vocab_size=VOCAB, hidden_size=32, layers=2, heads=4
    )


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """~16k tokens in 2 files: 126 packs of 128 tokens, documents of ~40 tokens (several per pack)."""
    from tokentrain.data.synth import synth_dataset

    out = tmp_path_factory.mktemp("data") / "train"
    synth_dataset(out, files=2, documents=400, seed=1, mean_length=40, vocab_size=VOCAB)
    return out


@pytest.fixture(scope="session")
def val_data(tmp_path_factory):
    from tokentrain.data.synth import synth_dataset

    out = tmp_path_factory.mktemp("data") / "val"
    synth_dataset(out, files=1, documents=40, seed=2, mean_length=40, vocab_size=VOCAB)
    return out


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real one-node Slurm on loopback (Debian's slurm-wlm), started once per session."""
    if os.geteuid() != 0:
        pytest.fail("the Slurm tests start slurmctld/slurmd and need root (as on CI)")
    subprocess.run(["bash", str(ROOT / "scripts" / "slurm_localhost.sh"), "start"], check=True, timeout=300)
    assert shutil.which("srun")
    yield
