"""User mistakes that once ended in `internal error: Xxx` (exit 1), through the real `tokentrain
train` in a subprocess: each is one line naming the file/setting and what to do, with its
documented exit code (config 2, data 3, failure 1), no traceback, never `internal error`,
and nothing a later run would resume from. The table is docs/reliability.md ("Bad input")."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from .helpers import TT, checkpoints, clean_env, error_lines, write_cfg

DOCS = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"
# Root passes every permission check: drop the capabilities that let it (as a normal user is).
NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def _data(tmp_path, tiny_data) -> Path:
    d = tmp_path / "data"
    shutil.copytree(tiny_data, d)
    return d


def _mount(path: Path, *opts: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(opts), "tmpfs", str(path)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")


class Case:
    """One bad input: how to make it, and the exit code and message regex it must give."""

    def __init__(self, code: int, pattern: str, make, *, prefix=()):
        self.code, self.pattern, self.make, self.prefix = code, pattern, make, list(prefix)


def unreadable_bin(t, m, d):
    (d / "part-000.bin").chmod(0)
    return {}, []


def unreadable_meta(t, m, d):
    (d / "part-000.bin.meta").chmod(0)
    return {}, []


def npz_meta(t, m, d):
    meta = np.load(d / "part-000.bin.meta")
    with open(d / "part-000.bin.meta", "wb") as f:
        np.savez(f, meta=meta)
    return {}, []


def damaged_cache(t, m, d):
    from tokentrain.data.format import discover_files
    from tokentrain.data.index import open_index

    open_index(discover_files(d), 1, True, 3, t / "cache" / "index")  # the entry train opens (seed 3, shuffled)
    entries = [p for p in (t / "cache" / "index").iterdir() if p.is_dir()]
    assert entries
    for e in entries:
        (e / "ends.npy").write_bytes(b"garbage")
    return {}, []


def cache_is_a_file(t, m, d):
    (t / "cachefile").write_text("x")
    return {"env": {"TOKENTRAIN_CACHE": str(t / "cachefile")}}, []


def cache_read_only(t, m, d):
    _mount(t / "rocache", "ro", "size=1m")
    return {"env": {"TOKENTRAIN_CACHE": str(t / "rocache")}}, []


def cache_full(t, m, d):
    _mount(t / "fullcache", "size=8k")
    return {"env": {"TOKENTRAIN_CACHE": str(t / "fullcache")}}, []


def work_dir_read_only(t, m, d):
    _mount(t / "row", "ro", "size=1m")
    return {"work": t / "row" / "w"}, []


def metrics_disk_full(t, m, d):
    _mount(t / "small", "size=48k")
    return {"work": t / "small" / "w", "cfg": dict(save_steps=100000, max_iters=400)}, []


def export_disk_full(t, m, d):
    _mount(t / "small", "size=1000k")  # the checkpoint (~830 kB) fits, the exported model (~300 kB) with it does not
    return {"work": t / "small" / "w", "cfg": dict(save_steps=100000, max_iters=3, save_total_limit=-1)}, ["--noop"]


def ds_list(t, m, d):
    (t / "ds.json").write_text("[1, 2]")
    return {}, ["--deepspeed", str(t / "ds.json")]


def ds_stage7(t, m, d):
    (t / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 7}}))
    return {}, ["--deepspeed", str(t / "ds.json")]


def complete_manifest(value):
    def make(t, m, d):
        env = clean_env(TOKENTRAIN_CACHE=str(t / "cache"))
        cfg = write_cfg(t / "run.py", m, d, max_iters=2)
        r = subprocess.run([*TT, "train", str(cfg), "--work-dir", str(t / "w")], env=env, capture_output=True)
        assert r.returncode == 0, r.stderr[-2000:]
        (t / "w" / "checkpoints" / "step_2" / "COMPLETE").write_text(value)
        return {"keep_checkpoints": True}, ["--resume", str(t / "w" / "checkpoints" / "step_2")]

    return make


def blank_prefix(t, m, d):
    p = d / "part-000.bin"
    p.write_bytes(b"\n" * (1 << 20) + b" \n" * 10 + p.read_bytes())
    (d / "part-000.bin.meta").unlink()
    return {}, []


def sys_exit(t, m, d):
    return {"raw": "import sys\nsys.exit(0)\n"}, []


def zero_byte_bin(t, m, d):
    (d / "part-000.bin").write_bytes(b"")
    return {}, []


def zero_counts(t, m, d):
    meta = np.load(d / "part-000.bin.meta")
    meta[:, 1] = 0
    np.save(d / "part-000.bin.meta", meta)
    os.replace(d / "part-000.bin.meta.npy", d / "part-000.bin.meta")
    return {}, []


def order_twice(t, m, d):
    (t / "order.txt").write_text("part-000.bin\npart-001.bin\npart-000.bin\n")
    return {"cfg": dict(data_order_path=str(t / "order.txt"))}, []


def order_outside(t, m, d):
    (t / "outside.bin").write_bytes((d / "part-001.bin").read_bytes())
    (t / "order.txt").write_text("part-000.bin\n../outside.bin\n")
    return {"cfg": dict(data_order_path=str(t / "order.txt"))}, []


CASES = {
    "unreadable .bin": Case(3, r"part-000\.bin: cannot read .*Permission denied", unreadable_bin, prefix=NO_DAC),
    "unreadable .meta": Case(
        3, r"part-000\.bin\.meta: cannot read the meta file \(Permission denied\)", unreadable_meta, prefix=NO_DAC
    ),
    ".npz meta": Case(3, r"part-000\.bin\.meta: .*npz.*; rebuild it with `tokentrain data index --rebuild`", npz_meta),
    "damaged index cache entry": Case(0, r"index cache entry .* is damaged .*; rebuilding it", damaged_cache),
    "TOKENTRAIN_CACHE is a file": Case(2, r"TOKENTRAIN_CACHE=.*cachefile: is a file", cache_is_a_file),
    "TOKENTRAIN_CACHE read-only": Case(2, r"TOKENTRAIN_CACHE=.*rocache: .*not writable", cache_read_only),
    "TOKENTRAIN_CACHE full": Case(1, r"TOKENTRAIN_CACHE=.*fullcache: no space left on device", cache_full),
    "--work-dir read-only": Case(2, r"--work-dir .*row/w: its parent .*row is not writable", work_dir_read_only),
    "disk full appending metrics": Case(
        1,
        r"small/w: no space left on device \(.* MiB free\) while writing the run.s outputs; no checkpoint",
        metrics_disk_full,
    ),
    "disk full exporting hf/": Case(
        1,
        r"cannot write the Hugging Face export .*hf: no space left on device; the checkpoints are intact",
        export_disk_full,
    ),
    "--seed -1": Case(2, r"seed = -1: must be >= 0", None),
    "DeepSpeed JSON a list": Case(2, r"--deepspeed .*ds\.json: must be a JSON object", ds_list),
    "DeepSpeed stage 7": Case(
        2, r"--deepspeed .*ds\.json: zero_optimization\.stage = 7: must be 0, 1, 2 or 3", ds_stage7
    ),
    "unpacked max_length=2**40": Case(2, r"max_length = 1099511627776: must be <= ", None),
    "attn_implementation='flex' on CPU": Case(2, r"attn_implementation = 'flex' needs .* on a CUDA device", None),
    "COMPLETE manifest {}": Case(1, r"step_2/COMPLETE: not a checkpoint manifest", complete_manifest("{}")),
    "COMPLETE manifest a list": Case(1, r"step_2/COMPLETE: not a checkpoint manifest", complete_manifest("[1]")),
    "> 1 MiB of blank lines first": Case(0, r"", blank_prefix),
    "config calls sys.exit(0)": Case(2, r"run\.py: the config called sys\.exit\(0\)", sys_exit),
    "0-byte .bin with a 30-row meta": Case(3, r"part-000\.bin: empty, but its meta lists \d+ lines", zero_byte_bin),
    "meta counts 0 for real lines": Case(
        3, r"part-000\.bin\.meta: row 0: 0 tokens, but line 1 .* has \d+", zero_counts
    ),
    "data_order lists a file twice": Case(3, r"order\.txt:3: 'part-000\.bin' is listed twice", order_twice),
    "data_order file outside the folder": Case(3, r"order\.txt:2: '\.\./outside\.bin' is outside", order_outside),
}
SETTINGS = {"--seed -1": ({}, ["--seed", "-1"]), "unpacked max_length=2**40": ({}, [])}
SETTINGS["attn_implementation='flex' on CPU"] = ({}, [])
CFG = {
    "unpacked max_length=2**40": dict(pack_to_max_length=False, max_length=2**40),
    "attn_implementation='flex' on CPU": dict(attn_implementation="flex"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_line_with_its_exit_code(case, tiny_model, tiny_data, tmp_path):
    c = CASES[case]
    data = _data(tmp_path, tiny_data)
    mounted = []
    try:
        opts, extra = c.make(tmp_path, tiny_model, data) if c.make else SETTINGS[case]
        mounted = [p for p in (tmp_path / n for n in ("rocache", "fullcache", "row", "small")) if p.is_dir()]
        extra = [a for a in extra if a != "--noop"]
        cfg = tmp_path / "run.py"
        if "raw" in opts:
            cfg.write_text(opts["raw"])
        else:
            write_cfg(cfg, tiny_model, data, **{"max_iters": 4, **CFG.get(case, {}), **opts.get("cfg", {})})
        work = Path(opts.get("work", tmp_path / "w"))
        env = clean_env(TOKENTRAIN_CACHE=str(tmp_path / "cache"))
        env.update(opts.get("env", {}))
        r = subprocess.run(
            [*c.prefix, *TT, "train", str(cfg), "--work-dir", str(work), *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        lines = error_lines(r.stderr)
        assert r.returncode == c.code, (r.returncode, r.stderr[-3000:])
        assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr[-3000:]
        if not c.code:
            assert re.search(c.pattern, r.stderr), r.stderr[-3000:]
        else:
            assert len(lines) == 1 and lines[0].startswith("tokentrain: error: "), r.stderr[-3000:]
            assert re.search(c.pattern, lines[0]), lines[0]
            if not opts.get("keep_checkpoints") and case != "disk full exporting hf/":
                assert not checkpoints(work)["complete"]
    finally:
        for p in mounted:
            subprocess.run(["umount", "-l", str(p)], capture_output=True)
        with contextlib.suppress(OSError):
            for p in data.iterdir():
                p.chmod(0o644)


def test_copy_cfg_refuses_to_overwrite_an_edited_copy(tmp_path):
    env = clean_env()
    r = subprocess.run([*TT, "copy-cfg", "tiny_demo", str(tmp_path)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    copy = tmp_path / "tiny_demo_copy.py"
    copy.write_text(copy.read_text() + "\n# my edit\n")
    r = subprocess.run([*TT, "copy-cfg", "tiny_demo", str(tmp_path)], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and error_lines(r.stderr) == [
        f"tokentrain: error: {copy} exists (an earlier copy, maybe edited); remove it, copy elsewhere, or pass --force"
    ]
    assert copy.read_text().endswith("# my edit\n")
    r = subprocess.run([*TT, "copy-cfg", "tiny_demo", str(tmp_path), "--force"], env=env, capture_output=True)
    assert r.returncode == 0 and not copy.read_text().endswith("# my edit\n")


def test_every_case_is_in_the_docs_table():
    table = DOCS.read_text()
    for case in CASES:
        assert f"| {case} |" in table, case


def test_a_relative_path_in_an_error_shows_where_it_was_looked_for(tiny_model, tmp_path):
    """Relative paths resolve against the working directory (under Slurm often not the folder one
    thinks): the one-line error adds the absolute path and that directory."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_cfg(run_dir / "cfg.py", tiny_model, "data/x", max_iters=1)
    write_cfg(run_dir / "nomodel.py", "./models/none", str(tmp_path), max_iters=1)
    env = clean_env(TOKENTRAIN_CACHE=str(tmp_path / "cache"))
    where = f"; relative to the working directory {run_dir})"
    for argv, code, shown in (
        (["train", "missing.py"], 2, f"missing.py (= {run_dir / 'missing.py'}{where}: config file not found"),
        (["train", "cfg.py"], 3, f"data/x (= {run_dir / 'data/x'}{where}: dataset folder does not exist"),
        (["train", "nomodel.py"], 2, f"./models/none (= {run_dir / 'models/none'}{where}: model folder does not exist"),
        (
            ["convert", "pth_to_hf", "cfg.py", "w/ckpt", "out"],
            2,
            f"w/ckpt (= {run_dir / 'w/ckpt'}{where}: no such folder",
        ),
    ):
        r = subprocess.run([*TT, *argv], cwd=run_dir, env=env, capture_output=True, text=True, timeout=120)
        lines = error_lines(r.stderr)
        assert r.returncode == code and len(lines) == 1 and shown in lines[0], (argv, r.stderr[-2000:])
    # An absolute path is shown as given.
    write_cfg(run_dir / "abs.py", tiny_model, str(run_dir / "data/x"), max_iters=1)
    r = subprocess.run([*TT, "train", "abs.py"], cwd=run_dir, env=env, capture_output=True, text=True, timeout=120)
    assert error_lines(r.stderr) == [
        f"tokentrain: error: {run_dir / 'data/x'}: dataset folder does not exist; check `dataset_folder`"
    ]
