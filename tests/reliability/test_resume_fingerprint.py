"""Resume fingerprint, through the real `tokentrain train` (docs/reliability.md, "Resume
fingerprint"): resuming after a change of the data, of a setting that changes the sample
stream, of the model's shape or of the global batch is refused in one line naming it, and
leaves the checkpoints as they were; `resume_ignore` lets it go on (logged); a change of the
world size with the same global batch is allowed."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket

import pytest

from tokentrain.data.index import ensure_meta

from .helpers import checkpoints, clean_env, error_lines, metrics, train, write_cfg


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model, tiny_data):
    """A finished 4-step run (checkpoints at 2 and 4) on its own copy of the data."""
    root = tmp_path_factory.mktemp("fp_base")
    data = root / "data"
    shutil.copytree(tiny_data, data)
    cfg = write_cfg(root / "run.py", tiny_model, data, max_iters=4)
    r = train(cfg, "--work-dir", root / "w", env=clean_env(TOKENTRAIN_CACHE=str(root / "cache")))
    assert r.returncode == 0, r.stderr[-3000:]
    return root


def _same_size_other_tokens(folder):
    """Change the first token of the first line without changing any length (so the meta is the same)."""
    p = folder / "part-000.bin"
    raw = p.read_bytes()
    i = raw.index(b"[") + 1
    j = i
    while raw[j : j + 1].isdigit():
        j += 1
    old = raw[i:j]
    new = str((int(old) + 1) % 10 ** len(old)).rjust(len(old), "1").encode()
    p.write_bytes(raw[:i] + new + raw[j:])
    ensure_meta(p)


def _add_file(folder):
    shutil.copyfile(folder / "part-001.bin", folder / "part-002.bin")
    shutil.copyfile(folder / "part-001.bin.meta", folder / "part-002.bin.meta")


# case -> (settings changed in the config, extra CLI args, what to do to a copy of the data, message regex)
CASES = {
    "max_length": (dict(max_length=64), [], None, r"max_length = 64, the checkpoint was trained with 128"),
    "shuffle_before_pack": (dict(shuffle_before_pack=False), [], None, r"shuffle_before_pack = False, .* True"),
    "seed": ({}, ["--seed", "4"], None, r"seed = 4, the checkpoint was trained with 3"),
    "min_length": (dict(min_length=20), [], None, r"min_length = 20, the checkpoint was trained with 1"),
    "zero_is_target": (dict(zero_is_target=True), [], None, r"zero_is_target = True"),
    "pack_to_max_length": (dict(pack_to_max_length=False), [], None, r"pack_to_max_length = False"),
    "batch_size": (dict(batch_size=1), [], None, r"global batch .* is 1, the checkpoint was trained with 2"),
    "accumulative_counts": (dict(accumulative_counts=2), [], None, r"global batch .* is 4, .* with 2"),
    "documents changed, same sizes": ({}, [], _same_size_other_tokens, r"part-000\.bin has other contents"),
    "a data file added": ({}, [], _add_file, r"the training data changed: 1 new \(e\.g\. part-002\.bin\)"),
    "data_order file": ({}, [], "order", r"the data_order_path file .* differs"),
    "validation set added": (dict(val_dataset_folder="{data}"), [], None, r"the validation set was added"),
    "model of another shape": ({}, [], "model", r"the model has another shape \(hidden_size 32 -> 64"),
}


def _case_dir(base, tmp_path, change):
    work = tmp_path / "w"
    shutil.copytree(base / "w", work)
    data = tmp_path / "data"
    shutil.copytree(base / "data", data)
    if callable(change):
        change(data)
    return work, data


def _changed_run(case: str, base, tmp_path, tiny_model, max_iters: int):
    """The work dir of the base run (a copy) and a config that differs from it as `case` says."""
    settings, _, change, _ = CASES[case]
    work, data = _case_dir(base, tmp_path, change)
    settings = {k: (v.format(data=data) if isinstance(v, str) else v) for k, v in settings.items()}
    if change == "order":
        (tmp_path / "order.txt").write_text("part-001.bin\npart-000.bin\n")
        settings["data_order_path"] = str(tmp_path / "order.txt")
    model = tiny_model
    if change == "model":
        from tokentrain.model.tiny import make_tiny_model

        model = make_tiny_model(tmp_path / "m64", vocab_size=512, hidden_size=64, layers=2, heads=4)
    return work, write_cfg(tmp_path / "run.py", model, data, max_iters=max_iters, **settings)


@pytest.mark.parametrize("case", list(CASES))
def test_a_changed_run_is_not_resumed(case, base, tmp_path, tiny_model):
    _, extra, change, pattern = CASES[case]
    work, cfg = _changed_run(case, base, tmp_path, tiny_model, max_iters=8)
    before = {p.name: p.stat().st_mtime_ns for p in (work / "checkpoints").rglob("*")}
    r = train(cfg, "--work-dir", work, "--resume", "auto", *extra, env=clean_env(TOKENTRAIN_CACHE=str(tmp_path / "c")))
    lines = error_lines(r.stderr)
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr[-3000:]
    assert lines[0].startswith("tokentrain: error: cannot resume from ") and "step_4" in lines[0], lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    assert ("cannot be ignored" if change == "model" else "resume_ignore = [") in lines[0]
    assert {p.name: p.stat().st_mtime_ns for p in (work / "checkpoints").rglob("*")} == before


def test_resume_ignore_lets_an_expert_go_on_and_is_logged(base, tmp_path, tiny_model):
    work, data = _case_dir(base, tmp_path, None)
    cfg = write_cfg(tmp_path / "run.py", tiny_model, data, max_iters=6, shuffle_before_pack=False)
    env = clean_env(TOKENTRAIN_CACHE=str(tmp_path / "c"))
    r = train(
        cfg, "--work-dir", work, "--resume", "auto", "--cfg-options", "resume_ignore=shuffle_before_pack", env=env
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"resuming from .*step_4 although shuffle_before_pack = False", r.stderr)
    assert checkpoints(work)["latest"] == "step_6"
    r = train(cfg, "--work-dir", work, "--resume", "auto", "--cfg-options", "resume_ignore=shufle", env=env)
    assert r.returncode == 2 and error_lines(r.stderr) == [
        "tokentrain: error: resume_ignore: unknown key 'shufle'; known: " + error_lines(r.stderr)[0].split("known: ")[1]
    ]


@pytest.mark.slow
def test_another_world_size_with_the_same_global_batch_resumes(base, tmp_path, tiny_model):
    """2 ranks x batch 1 continue a 1-rank x batch 2 run: the global batch is the same."""
    work, data = _case_dir(base, tmp_path, None)
    cfg = write_cfg(tmp_path / "run.py", tiny_model, data, max_iters=6, batch_size=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = clean_env(TOKENTRAIN_CACHE=str(tmp_path / "c"), NPROC_PER_NODE="2", PORT=str(port))
    r = train(cfg, "--work-dir", work, "--resume", "auto", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["step"] for m in metrics(work) if "step" in m][-2:] == [5, 6]


def _change_a_middle_document(p):
    """One token of a document in the middle of `p` becomes another of the same width: the
    same length, the same meta; the first and last 64 KiB untouched; mtime put back."""
    st = p.stat()
    raw = bytearray(p.read_bytes())
    i = raw.index(b"[", len(raw) // 2) + 1
    j = i
    while raw[j : j + 1].isdigit():
        j += 1
    old = raw[i:j]
    raw[i:j] = str((int(old) + 1) % 10 ** len(old)).rjust(len(old), "1").encode()
    assert raw[i:j] != old and i > 2 * (64 << 10) and len(raw) - i > 64 << 10
    p.write_bytes(bytes(raw))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_document_changed_in_the_middle_of_a_large_file_is_not_resumed(tiny_model, tmp_path):
    """A multi-MB file, one document's bytes changed in its middle with the same length and
    meta (and mtime): the content digest sees it; the same data resumes, also from a
    checkpoint whose fingerprint predates the digest (3 items per file)."""
    from tokentrain.data.synth import synth_dataset

    data = tmp_path / "data"
    synth_dataset(data, files=1, documents=6000, seed=5, mean_length=120, vocab_size=512)
    big = data / "part-000.bin"
    assert big.stat().st_size > 2 << 20
    env = clean_env(TOKENTRAIN_CACHE=str(tmp_path / "c"))
    cfg = write_cfg(tmp_path / "run.py", tiny_model, data, max_iters=1, save_steps=1)
    work = tmp_path / "w"
    assert train(cfg, "--work-dir", work, env=env).returncode == 0
    fp = work / "checkpoints" / "step_1" / "fingerprint.json"
    old = json.loads(fp.read_text())
    assert len(old["dataset"]["part-000.bin"]) == 4
    legacy = dict(old, dataset={k: v[:3] for k, v in old["dataset"].items()})
    fp.write_text(json.dumps(legacy))  # as an older version wrote it (its manifest agreeing): still resumes
    from tokentrain.checkpoint.manager import COMPLETE, manifest

    done = fp.parent / COMPLETE
    done.write_text(json.dumps(dict(json.loads(done.read_text()), files=manifest(fp.parent))))
    cfg2 = write_cfg(tmp_path / "run2.py", tiny_model, data, max_iters=2, save_steps=1)
    r = train(cfg2, "--work-dir", work, "--resume", "auto", env=env)
    assert r.returncode == 0 and "cannot resume" not in r.stderr, r.stderr[-3000:]
    _change_a_middle_document(big)
    before = {p.name: p.stat().st_mtime_ns for p in (work / "checkpoints").rglob("*")}
    cfg3 = write_cfg(tmp_path / "run3.py", tiny_model, data, max_iters=3, save_steps=1)
    r = train(cfg3, "--work-dir", work, "--resume", "auto", env=env)
    lines = error_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert re.search(
        r"cannot resume from .*step_2: the training data changed: part-000\.bin has other contents", lines[0]
    ), lines[0]
    assert {p.name: p.stat().st_mtime_ns for p in (work / "checkpoints").rglob("*")} == before


@pytest.mark.parametrize("case", list(CASES))
def test_every_key_a_refusal_suggests_lets_the_resume_go_on(case, base, tmp_path, tiny_model):
    """The `resume_ignore = [...]` a refusal prints works: with it the same resume trains on
    (a warning per ignored difference); a refusal whose difference cannot be ignored (a model
    of another shape: its weights do not fit) suggests none."""
    _, extra, change, _ = CASES[case]
    work, cfg = _changed_run(case, base, tmp_path, tiny_model, max_iters=6)
    env = clean_env(TOKENTRAIN_CACHE=str(tmp_path / "c"))
    r = train(cfg, "--work-dir", work, "--resume", "auto", *extra, env=env)
    (line,) = error_lines(r.stderr)
    found = re.search(r"resume_ignore = (\[.*?\])", line)
    if change == "model":
        assert r.returncode == 2 and found is None and "cannot be ignored" in line, line
        return
    keys = eval(found.group(1))
    r = train(
        cfg, "--work-dir", work, "--resume", "auto", *extra, "--cfg-options", f"resume_ignore={','.join(keys)}", env=env
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and re.search(r"resuming from .*step_4 although", r.stderr), r.stderr[-3000:]
    assert checkpoints(work)["latest"] == "step_6"


@pytest.mark.slow
def test_a_refused_resume_on_two_ranks_is_one_line_before_the_model_loads(base, tmp_path, tiny_model):
    """The fingerprint and the engine's format are checked by the main rank before any model is
    built; the other rank stops with its exit code, quietly: one line in all, no rank's
    traceback, no 'terminate called', no torch deprecation lines."""
    work, data = _case_dir(base, tmp_path, None)
    cfg = write_cfg(tmp_path / "run.py", tiny_model, data, max_iters=6, batch_size=1, seed=5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = clean_env(TOKENTRAIN_CACHE=str(tmp_path / "c"), NPROC_PER_NODE="2", PORT=str(port))
    r = train(cfg, "--work-dir", work, "--resume", "auto", env=env)
    lines = error_lines(r.stderr)
    assert r.returncode == 2, r.stderr[-3000:]
    assert [x for x in lines if "error:" in x and "torchrun" not in x] == [lines[0]], r.stderr[-3000:]
    assert lines[0].startswith("tokentrain: error: cannot resume from ") and "seed = 5" in lines[0], lines[0]
    for noise in ("Traceback", "terminate called", "FutureWarning", "init: ", "model: "):
        assert noise not in r.stderr, (noise, r.stderr[-3000:])
