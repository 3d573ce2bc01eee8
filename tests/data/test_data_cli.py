"""`tokentrain data ...`, in-process through cli.main.main and as a real subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.reliability.helpers import BIN
from tokentrain.cli.main import main
from tokentrain.data import format as fmt
from tokentrain.data.dataset import DataSettings, build_dataset

from .helpers import BAD_DATASETS, as_lists, line_bytes, make_bad_dataset, ref_packs, ref_unpacked, save_meta, write_bin

EXE = Path(BIN)  # the console script of the venv running the tests (not necessarily the checkout's .venv)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _hand(root: Path):
    """3 files (one empty), 6 documents (one empty), 19 tokens, 14 targets, 2 zeros."""
    write_bin(root / "a.bin", [[1, 2, 3], [4, -5, 0], [], [0]])
    write_bin(root / "sub" / "b.bin", [[-1, -2], [7] * 10])
    (root / "sub" / "c.bin").write_bytes(b"")
    return root


# --------------------------------------------------------------------------- stats


def test_stats_json_numbers(tmp_path, capsys):
    code, out, _ = run(capsys, "data", "stats", _hand(tmp_path), "--json")
    assert code == 0
    st = json.loads(out)
    assert st["files"] == 3 and st["empty_files"] == 1
    assert st["documents"] == 6 and st["empty_documents"] == 1
    assert st["tokens"] == 19 and st["target_tokens"] == 14 and st["id0_tokens"] == 2
    # lengths [0, 1, 2, 3, 3, 10]; numpy's "nearest" percentiles (index round(q * 5), half to even)
    assert st["length_percentiles"] == {"p0": 0, "p1": 0, "p10": 0, "p50": 2, "p90": 3, "p99": 10, "p100": 10}
    assert st["mean_length"] == pytest.approx(19 / 6)


def test_stats_counts_positive_tokens_only_as_targets(tmp_path, capsys):
    write_bin(tmp_path / "a.bin", [[5, 6, 7], [-1, 0, 9]])
    st = json.loads(run(capsys, "data", "stats", tmp_path, "--json")[1])
    assert (st["tokens"], st["target_tokens"], st["id0_tokens"]) == (6, 4, 1)


def test_stats_text(tmp_path, capsys):
    code, out, _ = run(capsys, "data", "stats", _hand(tmp_path))
    assert code == 0
    assert "documents: 6" in out and "tokens: 19" in out and "target_tokens: 14" in out and "p50=2" in out


# --------------------------------------------------------------------------- show


def _show(capsys, folder, *extra):
    code, out, err = run(capsys, "data", "show", folder, *extra, "--json")
    assert code == 0, err
    return json.loads(out)


def test_show_packed_no_shuffle_matches_reference(tmp_path, capsys):
    docs = [[1, 2, 3], [4, -5, 0, 6], [7, 8]]
    write_bin(tmp_path / "a.bin", docs)
    packs, _ = ref_packs(docs, 4)
    for k in range(2):
        got = _show(capsys, tmp_path, "--max-length", 4, "--index", k, "--no-shuffle")
        assert {key: got[key] for key in packs[k]} == packs[k]
        assert got["index"] == k and got["num_samples"] == 2
    got = _show(capsys, tmp_path, "--max-length", 4, "--index", 1, "--no-shuffle")
    assert got["sources"] == [
        {"file": str(tmp_path / "a.bin"), "line": 2},
        {"file": str(tmp_path / "a.bin"), "line": 3},
    ]


def test_show_seed_and_shuffle_match_the_dataset(tmp_path, capsys):
    write_bin(tmp_path / "a.bin", [[i + 1, i + 2] for i in range(0, 60, 2)])
    for seed in (0, 5):
        got = _show(capsys, tmp_path, "--max-length", 6, "--index", 3, "--seed", seed)
        ds = build_dataset(DataSettings(str(tmp_path), max_length=6, seed=seed))
        assert {k: got[k] for k in ("input_ids", "labels", "position_ids", "cu_seqlens")} == as_lists(ds[3])
    a = _show(capsys, tmp_path, "--max-length", 6, "--index", 0, "--seed", 0)["input_ids"]
    b = _show(capsys, tmp_path, "--max-length", 6, "--index", 0, "--seed", 5)["input_ids"]
    c = _show(capsys, tmp_path, "--max-length", 6, "--index", 0, "--no-shuffle")["input_ids"]
    assert c == [1, 2, 3, 4, 5, 6] and len({tuple(a), tuple(b), tuple(c)}) == 3


def test_show_unpacked_min_length_and_data_order(tmp_path, capsys):
    write_bin(tmp_path / "a.bin", [[1, 2, 3, 4, 5, 6], [7], [-8, 9, 10]])
    write_bin(tmp_path / "b.bin", [[11, 12]])
    got = _show(capsys, tmp_path, "--max-length", 4, "--index", 0, "--no-shuffle", "--unpacked")
    assert {k: got[k] for k in ("input_ids", "labels", "position_ids", "cu_seqlens")} == ref_unpacked(
        [1, 2, 3, 4, 5, 6], 4
    )
    got = _show(capsys, tmp_path, "--max-length", 4, "--index", 1, "--no-shuffle", "--unpacked", "--min-length", 2)
    assert got["input_ids"] == [8, 9, 10] and got["num_samples"] == 3
    (tmp_path / "order.txt").write_text("b.bin\na.bin\n")
    got = _show(
        capsys,
        tmp_path,
        "--max-length",
        4,
        "--index",
        0,
        "--no-shuffle",
        "--unpacked",
        "--data-order",
        tmp_path / "order.txt",
    )
    assert got["input_ids"] == [11, 12]


def test_show_index_out_of_range(tmp_path, capsys):
    write_bin(tmp_path / "a.bin", [[1, 2, 3, 4]])
    code, _out, err = run(capsys, "data", "show", tmp_path, "--max-length", 2, "--index", 2, "--json")
    assert code == 2 and "--index 2 out of range: the dataset has 2 samples" in err and "Traceback" not in err
    code, _out, err = run(capsys, "data", "show", tmp_path, "--max-length", 0, "--json")
    assert code == 2 and "--max-length must be positive" in err


# --------------------------------------------------------------------------- check


def test_check_clean(tmp_path, capsys):
    code, out, err = run(capsys, "data", "check", _hand(tmp_path))
    assert (code, out) == (0, "") and "checked 3 file(s): 0 problem(s)" in err


def test_check_lists_every_problem_with_line_and_byte(tmp_path, capsys):
    good = line_bytes([1, 2])
    a = tmp_path / "a.bin"  # meta built from the good lines, then two lines broken in place
    lines = [good.strip(), b'{"tokens": [1, 2.5]}', b'{"tokenz": [1]}', b"", b'{"tokens": [3, "x"]}', good.strip()]
    a.write_bytes(b"\n".join(lines) + b"\n")
    offs = np.cumsum([0] + [len(x) + 1 for x in lines])[:-1]
    save_meta(a, [[offs[0], 2], [offs[1], 2], [offs[2], 1], [offs[4], 2], [offs[5], 2]])
    b = tmp_path / "b.bin"  # no meta, two bad lines
    b.write_bytes(good + b"not json\n" + good + b'{"tokens": [true]}\n')
    c = tmp_path / "c.bin"  # stale meta: a line was appended
    write_bin(c, [[5, 6]])
    with c.open("ab") as f:
        f.write(good)
    code, out, err = run(capsys, "data", "check", tmp_path)
    assert code == 1
    lines_out = out.splitlines()
    assert lines_out == [
        f"{a}: line 2 (byte {offs[1]}): \"tokens\"[1] is 2.5 (float); token ids must be ints",
        f"{a}: line 3 (byte {offs[2]}): no \"tokens\" key; each line must be a JSON object like "
        f"{{\"tokens\": [1, -5, 2]}}",
        f"{a}: line 5 (byte {offs[4]}): \"tokens\"[1] is 'x' (str); token ids must be ints",
        f"{b}: no meta file b.bin.meta; build it with `tokentrain data index`",
        lines_out[4],
        f"{b}: line 4 (byte {2 * len(good) + 9}): \"tokens\"[0] is True (bool); token ids must be ints",
        lines_out[6],
    ]
    assert lines_out[4].startswith(f"{b}: line 2 (byte {len(good)}): malformed JSON")
    assert lines_out[6].startswith(f"{c}.meta: ") and "appended after indexing" in lines_out[6]
    assert "checked 3 file(s): 7 problem(s)" in err


def test_check_stale_meta_boundaries(tmp_path, capsys):
    p = tmp_path / "a.bin"
    write_bin(p, [[1, 2, 3], [4, 5, 6], [7]])
    p.write_bytes(line_bytes([1, 2, 3, 4, 5]) + line_bytes([6]) + line_bytes([7]))  # same size, same last line
    code, out, _ = run(capsys, "data", "check", tmp_path)
    assert code == 1 and out.splitlines() == [
        f"{p}: line 1 (byte 0): the line runs on past where the meta says it ends; rebuild the meta",
        f"{p}: line 1 (byte 22): the meta's offset is not at a line start; rebuild the meta",
    ]
    p.write_bytes(line_bytes([1, 2, 3, 4, 5, 6]) + line_bytes([7]) + line_bytes([8]))  # the last line moved
    code, out, _ = run(capsys, "data", "check", tmp_path)
    assert code == 1 and out.startswith(f"{p}.meta: ") and "does not start a line" in out


def test_check_malformed_last_line_reports_meta_and_lines(tmp_path, capsys):
    p = tmp_path / "a.bin"
    write_bin(p, [[1, 2], [3, 4]])
    p.write_bytes(p.read_bytes().replace(b"[3, 4]", b"[3, 4."))
    code, out, _ = run(capsys, "data", "check", tmp_path)
    lines = out.splitlines()
    assert code == 1 and len(lines) == 2
    assert lines[0].startswith(f"{p}.meta: the last line of {p} does not match the meta")
    assert lines[1].startswith(f"{p}: line 2 (byte 19): malformed JSON")


# --------------------------------------------------------------------------- index / order / synth


def test_index_builds_missing_then_rebuilds_all(tmp_path, capsys):
    write_bin(tmp_path / "a.bin", [[1, 2], [3]], meta=False)
    ref = write_bin(tmp_path / "sub" / "b.bin", [[4, 5, 6]])
    (tmp_path / "e.bin").write_bytes(b"")
    code, out, _ = run(capsys, "data", "index", tmp_path)
    assert (code, out.strip()) == (0, "wrote 1 meta file(s)")
    assert np.load(tmp_path / "a.bin.meta").tolist() == [[0, 2], [len(line_bytes([1, 2])), 1]]
    assert not (tmp_path / "e.bin.meta").exists()
    save_meta(tmp_path / "sub" / "b.bin", [[0, 99]])  # a wrong meta, kept without --rebuild
    assert run(capsys, "data", "index", tmp_path)[1].strip() == "wrote 0 meta file(s)"
    code, out, _ = run(capsys, "data", "index", tmp_path, "--rebuild")
    assert (code, out.strip()) == (0, "wrote 2 meta file(s)")
    assert np.load(tmp_path / "sub" / "b.bin.meta").tolist() == ref.tolist()


def test_index_bad_line_is_a_data_error(tmp_path, capsys):
    (tmp_path / "a.bin").write_bytes(line_bytes([1]) + b'{"tokens": [1.5]}\n')
    code, _, err = run(capsys, "data", "index", tmp_path)
    assert code == 3 and f"{tmp_path / 'a.bin'}: line 2 (byte 16)" in err and "Traceback" not in err


def test_index_read_only_folder(tmp_path, capsys, monkeypatch, cache_dir):
    write_bin(tmp_path / "a.bin", [[1, 2], [3]], meta=False)
    real = fmt.save_meta

    def deny(meta, path):
        if Path(path).parent == tmp_path:
            raise PermissionError(13, "Permission denied")
        return real(meta, path)

    monkeypatch.setattr(fmt, "save_meta", deny)
    code, _out, err = run(capsys, "data", "index", tmp_path)
    assert code == 0, err
    assert not (tmp_path / "a.bin.meta").exists() and len(list((cache_dir / "meta").iterdir())) == 1
    write_bin(tmp_path / "b.bin", [[1]])
    code, _, err = run(capsys, "data", "index", tmp_path, "--rebuild")
    assert code == 3 and "b.bin.meta: cannot rewrite the meta (Permission denied)" in err


def test_order_then_show_with_it(tmp_path, capsys):
    data = tmp_path / "data"
    write_bin(data / "z.bin", [[1, 2]])
    write_bin(data / "b" / "y.bin", [[3, 4]])
    write_bin(data / "a.bin", [[5, 6]])
    (data / "skip.txt").write_text("x")
    code, out, _ = run(capsys, "data", "order", "--data-folder", data, "--save-folder", tmp_path / "out")
    assert code == 0 and "(3 files)" in out
    assert (tmp_path / "out" / "data_order.txt").read_text() == "a.bin\nz.bin\nb/y.bin\n"
    run(capsys, "data", "order", "--data-folder", data, "--save-folder", tmp_path / "out2", "--file-type", ".txt")
    assert (tmp_path / "out2" / "data_order.txt").read_text() == "skip.txt\n"
    got = _show(
        capsys,
        data,
        "--max-length",
        2,
        "--index",
        2,
        "--no-shuffle",
        "--data-order",
        tmp_path / "out" / "data_order.txt",
    )
    assert got["input_ids"] == [3, 4]


def _tree_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synth_is_deterministic_and_valid(tmp_path, capsys):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        code, out, _ = run(
            capsys,
            "data",
            "synth",
            tmp_path / name,
            "--files",
            3,
            "--documents",
            50,
            "--seed",
            seed,
            "--mean-length",
            40,
        )
        assert code == 0 and "wrote 3 file(s) with 50 documents" in out
    a, b, c = (_tree_bytes(tmp_path / n) for n in "abc")
    assert a == b and a != c
    assert sorted(a) == [
        "part-000.bin",
        "part-000.bin.meta",
        "part-001.bin",
        "part-001.bin.meta",
        "part-002.bin",
        "part-002.bin.meta",
    ]
    assert run(capsys, "data", "check", tmp_path / "a")[0] == 0
    st = json.loads(run(capsys, "data", "stats", tmp_path / "a", "--json")[1])
    assert st["files"] == 3 and st["documents"] == 50 and st["length_percentiles"]["p0"] >= 2


# --------------------------------------------------------------------------- bad input through the CLI


@pytest.mark.parametrize("case", BAD_DATASETS)
def test_bad_input_one_line_exit_3(tmp_path, capsys, case):
    folder, extra, pattern = make_bad_dataset(tmp_path, case)
    stats_extra = [a for a in extra if a != "--no-shuffle"]
    for argv in (
        ["data", "show", folder, "--max-length", 3, "--json", *extra],
        ["data", "stats", folder, *stats_extra],
    ):
        code, _out, err = run(capsys, *argv)
        assert code == 3, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tokentrain: error: ") and "Traceback" not in err
        assert re.search(pattern, lines[0]), lines[0]


def test_dangling_symlink(tmp_path, capsys):
    write_bin(tmp_path / "a.bin", [[1, 2, 3]])
    os.symlink(tmp_path / "gone", tmp_path / "b.bin")
    code, out, err = run(capsys, "data", "check", tmp_path)
    assert code == 1 and out == f"{tmp_path / 'b.bin'}: cannot read data file (No such file or directory)\n"
    for argv in (["data", "stats", tmp_path], ["data", "show", tmp_path, "--max-length", 2, "--json"]):
        code, _, err = run(capsys, *argv)
        assert code == 3 and f"{tmp_path / 'b.bin'}: cannot read data file" in err and "Traceback" not in err


def test_tolerated_input_through_show(tmp_path, capsys):
    """Empty files are skipped, all-negative documents kept, CRLF lines read correctly."""
    write_bin(tmp_path / "a.bin", [[1, 2], [-3, -4, -5], [6, 7, 8]], newline=b"\r\n")
    (tmp_path / "b.bin").write_bytes(b"")
    got = _show(capsys, tmp_path, "--max-length", 7, "--no-shuffle")
    assert got["input_ids"] == [1, 2, 3, 4, 5, 6, 7]
    assert got["labels"] == [2, -100, -100, -100, -100, 7, 8]
    assert got["num_samples"] == 1


# --------------------------------------------------------------------------- subprocess


def _env(cache):
    env = dict(os.environ, TOKENTRAIN_CACHE=str(cache))
    return env


def test_real_subprocess_stats_and_error(tmp_path, cache_dir):
    assert EXE.exists()
    data = _hand(tmp_path / "d")
    r = subprocess.run(
        [str(EXE), "data", "stats", str(data), "--json"],
        capture_output=True,
        text=True,
        env=_env(cache_dir),
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] == 19
    (data / "a.bin").write_bytes(b'{"tokens": [1, 2]}\n{"tokens": [1, "2"]}\n')
    (data / "a.bin.meta").unlink()
    r = subprocess.run(
        [str(EXE), "data", "show", str(data), "--max-length", "2", "--json"],
        capture_output=True,
        text=True,
        env=_env(cache_dir),
        timeout=120,
    )
    assert r.returncode == 3 and r.stdout == ""
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith(
        f"tokentrain: error: {data / 'a.bin'}"
    )
    assert "line 2 (byte 19)" in r.stderr


def test_real_subprocess_synth_deterministic(tmp_path, cache_dir):
    for name in ("x", "y"):
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "tokentrain",
                "data",
                "synth",
                str(tmp_path / name),
                "--files",
                "2",
                "--documents",
                "7",
                "--seed",
                "4",
            ],
            capture_output=True,
            text=True,
            env=_env(cache_dir),
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
    assert _tree_bytes(tmp_path / "x") == _tree_bytes(tmp_path / "y")
