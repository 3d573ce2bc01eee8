"""Nothing is deleted before the new work is proven able to start, through the real CLI
(docs/reliability.md, "Checkpoint safety and deletions"): `convert pth_to_hf` refuses an output
folder that holds anything (without --force) and one that is, holds or lies inside the
checkpoints (even with it); `train --overwrite` keeps the old run whole when the new one
cannot start; `--resume auto` with every checkpoint damaged is a refusal naming each and what
of it is intact, not a fresh start. Each time the old files are checked byte for byte."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest

from tokentrain.distributed.spawn import _free_port

from .helpers import TT, checkpoints, clean_env, error_lines, metrics, train, write_cfg


@pytest.fixture(scope="module")
def old_run(tiny_model, tiny_data, tmp_path_factory):
    """A finished run: checkpoints step_2 and step_4, metrics, hf/."""
    root = tmp_path_factory.mktemp("old")
    cfg = write_cfg(root / "run.py", tiny_model, tiny_data, max_iters=4)
    env = clean_env(TOKENTRAIN_CACHE=str(root / "cache"))
    work = root / "w"
    r = train(cfg, "--work-dir", work, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(cfg=cfg, env=env, work=work)


def copy_of(old_run, tmp_path) -> Path:
    work = tmp_path / "w"
    shutil.copytree(old_run["work"], work)
    return work


def contents(folder: Path) -> dict[str, str]:
    """Every file's SHA-256 (the lock and owner files aside: they belong to whichever run holds the dir)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".tokentrain.")
    }


def one_line(r, code: int, pattern: str) -> str:
    lines = error_lines(r.stderr)
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1 and "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr[-3000:]
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def convert(cfg, ckpt, out, *extra, env):
    import subprocess

    return subprocess.run(
        [*TT, "convert", "pth_to_hf", str(cfg), str(ckpt), str(out), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_convert_never_replaces_a_folder_that_holds_anything_or_the_checkpoints(old_run, tmp_path):
    work = copy_of(old_run, tmp_path)
    cfg, env = old_run["cfg"], old_run["env"]
    before = contents(work)

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    one_line(convert(cfg, work, out, env=env), 2, r"OUT_DIR .*out: not empty.*--force")
    assert (out / "notes.txt").read_text() == "mine"
    one_line(convert(cfg, work, work, env=env), 2, r"OUT_DIR .*w: not empty")
    for target, how in (
        (work, "holds"),
        (work / "checkpoints" / "step_4", "is"),
        (work / "checkpoints" / "x", "lies inside"),
    ):
        one_line(
            convert(cfg, work, target, "--force", env=env), 2, rf"OUT_DIR .*: {how} the checkpoints being converted"
        )
    (tmp_path / "file").write_text("x")
    one_line(convert(cfg, work, tmp_path / "file", "--force", env=env), 2, r"exists and is not a folder")
    assert contents(work) == before and not (work / "checkpoints" / "x").exists()

    r = convert(cfg, work, out, "--force", env=env)  # replaces what the user named, written aside first
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "config.json").is_file() and not (out / "notes.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    r = convert(cfg, work / "checkpoints" / "step_2", empty, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert contents(work) == before


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(old_run, tmp_path, tiny_data):
    from tokentrain.model.tiny import make_tiny_model

    work = copy_of(old_run, tmp_path)
    env = old_run["env"]
    before = contents(work)
    small = make_tiny_model(tmp_path / "small", vocab_size=300, hidden_size=32, layers=1, heads=4)
    bad = write_cfg(tmp_path / "bad.py", small, tiny_data, max_iters=2)  # tokens >= vocab: found after the model loads
    r = train(bad, "--work-dir", work, "--overwrite", env=env)
    one_line(r, 3, r"vocab")
    assert "restored" in r.stderr
    after = contents(work)
    after.pop("bad.py", None)  # the config copy of the attempt
    assert after == before and not (work / ".overwritten").exists()

    r = train(old_run["cfg"], "--work-dir", work, "--overwrite", "--cfg-options", "max_iters=2", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--overwrite: deleted the earlier run's checkpoints, metrics.jsonl, hf" in r.stderr
    assert checkpoints(work)["complete"] == ["step_2"] and not (work / ".overwritten").exists()
    assert [m["step"] for m in metrics(work) if "step" in m] == [1, 2]


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.distributed)])
def test_resume_auto_with_every_checkpoint_damaged_is_refused_not_restarted(old_run, tmp_path, ranks):
    work = copy_of(old_run, tmp_path)
    for step in ("step_2", "step_4"):
        opt = work / "checkpoints" / step / "optimizer.pt"
        data = bytearray(opt.read_bytes())
        data[len(data) // 2] ^= 0xFF
        opt.write_bytes(bytes(data))
    before = contents(work)
    env = dict(old_run["env"], **({"NPROC_PER_NODE": "2", "PORT": str(_free_port())} if ranks > 1 else {}))
    r = train(old_run["cfg"], "--work-dir", work, "--resume", "auto", "--cfg-options", "max_iters=6", env=env)
    lines = [x for x in error_lines(r.stderr) if "no intact checkpoint" in x]
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and lines, r.stderr[-3000:]
    line = lines[0]
    assert re.search(r"step_4: .*optimizer\.pt: contents changed.*\(intact: .*model\.safetensors", line), line
    assert re.search(r"step_2: .*optimizer\.pt: contents changed", line), line
    assert "nothing was changed" in line and "--overwrite" in line
    assert contents(work) == before


def test_a_delete_of_the_set_aside_run_cut_by_a_kill_never_comes_back_over_the_new_run(tmp_path):
    """--overwrite deletes the old run only once the new one has a checkpoint; a kill in the middle
    of that delete must not make the next start 'restore' half of the old run over the new one."""
    from tokentrain.run import workdir

    (tmp_path / "checkpoints" / "step_9").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text('{"step": 9}\n')
    workdir.set_aside_previous_run(tmp_path)
    (tmp_path / "checkpoints" / "step_1").mkdir(parents=True)  # the new run's first checkpoint
    doomed = tmp_path / workdir.DOOMED
    (tmp_path / workdir.ASIDE).rename(doomed)  # what drop_set_aside does first ...
    (doomed / "metrics.jsonl").unlink()  # ... and a kill partway through its delete
    workdir.restore_set_aside(tmp_path)  # the next start
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_1"]
    assert not doomed.exists() and not (tmp_path / workdir.ASIDE).exists()
    assert not (tmp_path / "metrics.jsonl").exists()
