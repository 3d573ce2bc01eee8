"""Checkpoints that move, through the real CLI (a tied config-only tiny Llama, fp32 on CPU, gloo):
DDP (2 ranks) -> FSDP2 (2 ranks) -> DDP, and ZeRO-2 on 2 ranks -> 1 rank -> 2 ranks, each leg
resumed from the previous leg's checkpoint, reproduce the uninterrupted run's per-step losses
and final parameters (<= 1e-6 relative); the moves still impossible (DeepSpeed <-> the others)
and another ZeRO stage are refused in one line naming the conversion, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engines.engine_helpers import (
    copy_checkpoint,
    error_lines,
    rel_diff,
    scratch_job,
    tokentrain,
    weights,
)
from tests.reliability.helpers import metrics, one_error_line
from tokentrain.distributed.spawn import _free_port

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = 6  # checkpoints at 2, 4, 6


class Job:
    """A config-only tiny model, its data and config (global batch 2: 1 x 1 x 2 ranks, or 1 x 2 x 1)."""

    def __init__(self, root: Path):
        self.root = root
        self.cfg, self.env = scratch_job(root, max_iters=STEPS, accumulative_counts=1)
        self.done: set[str] = set()

    def uninterrupted(self, name: str, *args) -> Path:
        """The work dir of the uninterrupted 2-rank run `name` (run once, on demand)."""
        work = self.root / name
        if name not in self.done:
            self.ok(work, *args)
            self.done.add(name)
        return work

    def run(self, work: Path, *args, ranks: int = 2, resume: Path | None = None):
        """`tokentrain train` into `work` (resumed from a copy of the checkpoint `resume`); the result."""
        env = dict(self.env, NPROC_PER_NODE=str(ranks), PORT=str(_free_port())) if ranks > 1 else self.env
        more = ["--cfg-options", f"accumulative_counts={2 // ranks}"]
        if resume is not None:
            copy_checkpoint(resume, work)
            more += ["--resume", "auto"]
        return tokentrain("train", self.cfg, "--work-dir", work, *args, *more, env=env, timeout=400)

    def ok(self, work: Path, *args, **kw) -> str:
        r = self.run(work, *args, **kw)
        assert r.returncode == 0, error_lines(r.stderr) or r.stderr[-3000:]
        return r.stderr


def step_losses(work: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(work) if "loss" in r}


def assert_legs_match(full: Path, legs: list[tuple[Path, list[int]]]) -> None:
    """Each leg logged exactly `steps`, with the uninterrupted run's losses; the last ends on its weights."""
    want = step_losses(full)
    assert sorted(want) == list(range(1, STEPS + 1))
    for leg, steps in legs:
        got = step_losses(leg)
        assert sorted(got) == steps, leg.name
        assert [got[s] for s in steps] == pytest.approx([want[s] for s in steps], rel=1e-6, abs=0), leg.name
    assert rel_diff(weights(legs[-1][0]), weights(full)) <= 1e-6


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Job:
    return Job(tmp_path_factory.mktemp("moves"))


def test_ddp_to_fsdp2_to_ddp_reproduces_the_uninterrupted_run(job):
    full = job.uninterrupted("ddp")
    fsdp2 = job.root / "ddp_fsdp2"
    log = job.ok(fsdp2, "--engine", "fsdp2", resume=full / "checkpoints" / "step_2")
    assert "a local/DDP checkpoint, sharded over 2 rank(s)" in log
    back = job.root / "ddp_fsdp2_ddp"
    log = job.ok(back, "--engine", "ddp", resume=fsdp2 / "checkpoints" / "step_4")
    assert "an FSDP2 checkpoint, read whole" in log
    assert_legs_match(full, [(fsdp2, [3, 4, 5, 6]), (back, [5, 6])])


@pytest.mark.deepspeed
def test_zero2_two_ranks_to_one_to_two_reproduces_the_uninterrupted_run(job):
    ds = ("--deepspeed", "deepspeed_zero2")
    full = job.uninterrupted("zero2", *ds)
    one = job.root / "zero2_1"
    log = job.ok(one, *ds, ranks=1, resume=full / "checkpoints" / "step_2")
    assert "written by 2 rank(s): converted to DeepSpeed's universal checkpoint" in log, log[-3000:]
    two = job.root / "zero2_1_2"
    log = job.ok(two, *ds, resume=one / "checkpoints" / "step_4")
    assert "written by 1 rank(s): converted to DeepSpeed's universal checkpoint" in log, log[-3000:]
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["latest", "step_4", "step_6"]  # (none left)
    assert_legs_match(full, [(one, [3, 4, 5, 6]), (two, [5, 6])])


@pytest.mark.deepspeed
def test_moves_between_deepspeed_and_the_other_engines_are_refused_naming_the_conversion(job, tmp_path):
    """(Resumed in one process: a refusal on 2 ranks is the same line from each.)"""
    zero2 = job.uninterrupted("zero2", "--deepspeed", "deepspeed_zero2") / "checkpoints" / "step_2"
    ddp = job.uninterrupted("ddp") / "checkpoints" / "step_2"
    line = one_error_line(
        job.run(tmp_path / "fsdp2", "--engine", "fsdp2", ranks=1, resume=zero2), 2, "written by the deepspeed"
    )
    assert "--deepspeed deepspeed_zero2" in line and "`tokentrain convert pth_to_hf`" in line, line
    line = one_error_line(
        job.run(tmp_path / "ds", "--deepspeed", "deepspeed_zero2", ranks=1, resume=ddp), 2, "written by the ddp"
    )
    assert "--engine local | ddp | fsdp2 (no --deepspeed)" in line and "`tokentrain convert pth_to_hf`" in line, line
    line = one_error_line(
        job.run(tmp_path / "z1", "--deepspeed", "deepspeed_zero1", ranks=1, resume=zero2), 2, "ZeRO stage 2"
    )
    assert "--deepspeed deepspeed_zero2" in line and "`tokentrain convert pth_to_hf`" in line, line
