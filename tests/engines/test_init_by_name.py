"""Training from scratch (a config-only folder, tied embeddings) through the real CLI: every engine
starts from the same initial weights (model/init.py: initialised by name), so local, ZeRO-1/2/3
and FSDP2 in one process, and DDP, ZeRO-3 and FSDP2 on 2 ranks log the losses of the one-process
local run, and the same init digest."""

from __future__ import annotations

import re

import pytest

from tests.engines.engine_helpers import error_lines, losses, scratch_job, tokentrain
from tokentrain.distributed.spawn import _free_port

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

RUNS = {  # name: (arguments, ranks)
    "zero1": (["--deepspeed", "deepspeed_zero1"], 1),
    "zero2": (["--deepspeed", "deepspeed_zero2"], 1),
    "zero3": (["--deepspeed", "deepspeed_zero3"], 1),
    "fsdp2": (["--engine", "fsdp2"], 1),
    "ddp_2": (["--engine", "ddp"], 2),
    "zero3_2": (["--deepspeed", "deepspeed_zero3"], 2),
    "fsdp2_2": (["--engine", "fsdp2"], 2),
}


class Job:
    """A config-only tiny model and its data; each run once, on demand."""

    def __init__(self, root):
        self.root = root
        self.cfg, self.env = scratch_job(root, save_steps=1000)
        self.logs: dict[str, str] = {}

    def run(self, name: str) -> tuple[list[float], str]:
        """(losses, init digest) of run `name` (or "local"); 2 ranks keep the global batch of 2."""
        if name not in self.logs:
            args, nproc = RUNS.get(name, ([], 1))
            env = self.env
            if nproc > 1:
                env = dict(env, NPROC_PER_NODE=str(nproc), PORT=str(_free_port()))
                args = [*args, "--cfg-options", "accumulative_counts=1"]
            r = tokentrain("train", self.cfg, "--work-dir", self.root / name, *args, env=env, timeout=400)
            assert r.returncode == 0, error_lines(r.stderr) or r.stderr[-3000:]
            self.logs[name] = r.stderr
        found = re.findall(r"init: \d+ tensors initialised by name from seed 7, digest ([0-9a-f]{8})", self.logs[name])
        assert len(set(found)) == 1, found
        return losses(self.root / name), found[0]


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Job:
    return Job(tmp_path_factory.mktemp("init_by_name"))


@pytest.mark.parametrize("name", list(RUNS))
def test_every_engine_starts_from_the_same_weights(job, name):
    ref_losses, ref_digest = job.run("local")
    got_losses, got_digest = job.run(name)
    assert got_digest == ref_digest
    assert len(got_losses) == 4
    assert got_losses == pytest.approx(ref_losses, rel=1e-5)
