"""data/format.py: file discovery, token semantics, line parsing, meta validation."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokentrain.data import format as fmt
from tokentrain.errors import DataError

from .helpers import line_bytes, ref_labels, save_meta, write_bin

# --------------------------------------------------------------------------- discovery


def _touch(root: Path, *rels: str) -> None:
    for r in rels:
        p = root / r
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


def _rel(root, files):
    return [str(Path(f).relative_to(root)) for f in files]


def test_walk_order_files_before_sorted_subfolders(tmp_path):
    _touch(tmp_path, "b.bin", "a.bin", "z/2.bin", "z/1.bin", "m/x.bin", "m/deep/q.bin", "m/a.bin", "c.bin")
    assert _rel(tmp_path, fmt.discover_files(tmp_path)) == [
        "a.bin",
        "b.bin",
        "c.bin",
        "m/a.bin",
        "m/x.bin",
        "m/deep/q.bin",
        "z/1.bin",
        "z/2.bin",
    ]


def test_walk_order_does_not_depend_on_creation_order(tmp_path):
    names = ["k", "c", "x", "a", "q", "e", "m", "b", "z", "h", "0", "B"]
    for n in names:  # created unsorted: the file system's own listing order is not sorted
        _touch(tmp_path, f"{n}.bin", f"d{n}/{n}.bin", f"d{n}/s{n}/{n}.bin")
    want = [f"{n}.bin" for n in sorted(names)]
    for n in sorted(names):
        want += [f"d{n}/{n}.bin", f"d{n}/s{n}/{n}.bin"]
    assert _rel(tmp_path, fmt.discover_files(tmp_path)) == want


def test_walk_takes_only_file_type(tmp_path):
    _touch(tmp_path, "a.bin", "a.bin.meta", "b.txt", "sub/c.bin", "sub/c.jsonl", "binx", "d.bin.bak")
    assert _rel(tmp_path, fmt.discover_files(tmp_path)) == ["a.bin", "sub/c.bin"]
    assert _rel(tmp_path, fmt.discover_files(tmp_path, ".jsonl")) == ["sub/c.jsonl"]


def test_walk_follows_symlinked_folders_and_files_reading_each_real_file_once(tmp_path, caplog):
    data, other = tmp_path / "data", tmp_path / "elsewhere"
    _touch(other, "o1.bin", "inner/o2.bin")
    _touch(data, "a.bin")
    os.symlink(other, data / "linked")
    os.symlink(other / "o1.bin", data / "b.bin")
    caplog.set_level("WARNING", logger="tokentrain")
    # linked/o1.bin is b.bin again: read once (the first path found), logged.
    assert _rel(data, fmt.discover_files(data)) == ["a.bin", "b.bin", "linked/inner/o2.bin"]
    assert "linked/o1.bin: the same file as" in caplog.text and "read once, not twice" in caplog.text


def test_symlink_loop_is_detected_not_followed(tmp_path, caplog):
    _touch(tmp_path, "a.bin", "sub/b.bin")
    os.symlink(tmp_path, tmp_path / "sub" / "loop")  # back to the root
    os.symlink("..", tmp_path / "sub" / "up")  # relative loop
    caplog.set_level("WARNING", logger="tokentrain")
    files = fmt.discover_files(tmp_path)
    assert _rel(tmp_path, files) == ["a.bin", "sub/b.bin"]
    assert "symlink" in caplog.text


def test_two_folder_symlink_cycle_ends_and_sibling_links_are_read_once(tmp_path, caplog):
    # A/toB -> B and B/toA -> A: no single link points above itself, yet the walk would
    # never end without tracking the folders already walked; and each folder is read once.
    _touch(tmp_path, "A/a.bin", "B/b.bin")
    os.symlink("../B", tmp_path / "A" / "toB")
    os.symlink("../A", tmp_path / "B" / "toA")
    caplog.set_level("WARNING", logger="tokentrain")
    files = fmt.discover_files(tmp_path)
    assert _rel(tmp_path, files) == ["A/a.bin", "B/b.bin"]
    assert caplog.text.count("read once, not twice") == 2


def test_a_folder_reached_twice_through_a_symlink_is_read_once(tmp_path, caplog):
    _touch(tmp_path, "real/a.bin", "real/sub/b.bin")
    os.symlink("real", tmp_path / "zlink")  # a sibling link to the same folder
    os.symlink("../real/sub", tmp_path / "real" / "again")  # and one inside it
    caplog.set_level("WARNING", logger="tokentrain")
    assert _rel(tmp_path, fmt.discover_files(tmp_path)) == ["real/a.bin", "real/sub/b.bin"]
    assert "zlink: the same folder as" in caplog.text and "skipped 2 second path(s)" in caplog.text


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        fmt.discover_files(tmp_path / "nope")


def test_folder_is_a_file(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"")
    with pytest.raises(DataError, match="not a directory"):
        fmt.discover_files(tmp_path / "f.bin")


def test_no_matching_files(tmp_path):
    _touch(tmp_path, "a.txt", "sub/b.json")
    with pytest.raises(DataError, match="no files ending with '.bin'"):
        fmt.discover_files(tmp_path)


def test_data_order_exact_files_in_listed_order(tmp_path):
    _touch(tmp_path, "a.bin", "b.bin", "sub/c.bin", "notlisted.bin", "other.txt")
    order = tmp_path / "order.txt"
    order.write_text("sub/c.bin\n\n  \nother.txt\na.bin\r\n\n")
    assert _rel(tmp_path, fmt.discover_files(tmp_path, data_order_path=order)) == ["sub/c.bin", "other.txt", "a.bin"]


def test_data_order_missing_entry_names_line(tmp_path):
    _touch(tmp_path, "a.bin")
    order = tmp_path / "order.txt"
    order.write_text("a.bin\n\nmissing.bin\n")
    with pytest.raises(DataError, match=r"order.txt:3: .*'missing.bin' does not exist"):
        fmt.discover_files(tmp_path, data_order_path=order)


def test_data_order_unreadable_or_empty(tmp_path):
    _touch(tmp_path, "a.bin")
    with pytest.raises(DataError, match="cannot read data order file"):
        fmt.discover_files(tmp_path, data_order_path=tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="lists no files"):
        fmt.discover_files(tmp_path, data_order_path=tmp_path / "empty.txt")


def test_relative_order_matches_walk(tmp_path):
    _touch(tmp_path, "b/1.bin", "a.bin", "b/0.bin")
    assert fmt.relative_order(tmp_path) == ["a.bin", "b/0.bin", "b/1.bin"]


# --------------------------------------------------------------------------- tokens


def test_inputs_and_targets_spec_example():
    raw = np.array([1, -333, -352, 0, 7, 13, 2, -5, 9])
    ids, tg = fmt.inputs_and_targets(raw)
    assert ids.tolist() == [1, 333, 352, 0, 7, 13, 2, 5, 9]
    assert tg.tolist() == [-100, -100, -100, 7, 13, 2, -100, 9, -100]
    _, tz = fmt.inputs_and_targets(raw, zero_is_target=True)
    assert tz.tolist() == [-100, -100, 0, 7, 13, 2, -100, 9, -100]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-20, 20), max_size=12), st.booleans())
def test_inputs_and_targets_matches_reference(doc, zt):
    ids, tg = fmt.inputs_and_targets(np.asarray(doc, dtype=np.int64), zero_is_target=zt)
    assert ids.tolist() == [abs(t) for t in doc]
    assert tg.tolist() == ref_labels(doc, zt)


# --------------------------------------------------------------------------- lines


@pytest.mark.parametrize(
    "line,expected",
    [
        (b'{"tokens": [1, -2, 0, 3]}\n', [1, -2, 0, 3]),
        (b'{"tokens":[1,-2,0,3]}', [1, -2, 0, 3]),
        (b'{"tokens": [5, 6]}\r\n', [5, 6]),
        (b'{"tokens": []}\n', []),
        (b'{"tokens": [ ]}\n', []),
        (b'{"tokens": [1, 2], "meta": {"src": "x"}}\n', [1, 2]),
        (b'{"id": 3, "tokens": [4]}\n', [4]),
        (b'  {"tokens" : [ 1 , -2 ] }  \n', [1, -2]),
        (b'{"tokens": [-0, 7]}', [0, 7]),
        (b'{"tokens": [2147483647, -2147483647]}', [2147483647, -2147483647]),
    ],
)
def test_parse_valid_lines(line, expected):
    got = fmt.parse_line(line, "f.bin", 1, 0)
    assert got.dtype == np.int64 and got.tolist() == expected


@pytest.mark.parametrize(
    "line,match",
    [
        (b'{"tokens": [1, 2\n', "malformed JSON"),
        (b'not json\n', "malformed JSON"),
        (b'{"tokens": [1, 2]} {"tokens": [3]}\n', "malformed JSON"),
        (b'{"tokens": [1, 2,]}\n', "malformed JSON"),
        (b'{"tokens": [1, 2]}\xff\n', "malformed JSON"),
        (b'{"tokens": [1, 2], "text": "\xff\xfe"}\n', "malformed JSON"),
        (b'{"tokens": [1, 2]\n', "malformed JSON"),
        (b'{"tokens": [1 2]}\n', "malformed JSON"),
        (b'{"tokens": [-]}\n', "malformed JSON"),
        (b'{"tokens": [1, -, 2]}\n', "malformed JSON"),
        (b'{"tokens": [+5]}\n', "malformed JSON"),
        (b'{"tokenz": [1, 2]}\n', 'no "tokens" key'),
        (b'[1, 2]\n', 'no "tokens" key'),
        (b'"tokens"\n', 'no "tokens" key'),
        (b'{"tokens": 5}\n', "must be a list of ints, got int"),
        (b'{"tokens": "1,2"}\n', "must be a list of ints, got str"),
        (b'{"tokens": null}\n', "must be a list of ints, got NoneType"),
        (b'{"tokens": [1, 2.0]}\n', r'"tokens"\[1\] is 2.0 \(float\)'),
        (b'{"tokens": [1, 2.5]}\n', r'"tokens"\[1\] is 2.5 \(float\)'),
        (b'{"tokens": [1e3]}\n', r'"tokens"\[0\] is 1000.0 \(float\)'),
        (b'{"tokens": [1, "2"]}\n', r"'2' \(str\)"),
        (b'{"tokens": [[1, 2]]}\n', r"\[1, 2\] \(list\)"),
        (b'{"tokens": [1, [2]]}\n', r"\[2\] \(list\)"),
        (b'{"tokens": [true, 1]}\n', r"True \(bool\)"),
        (b'{"tokens": [1, false]}\n', r"False \(bool\)"),
        (b'{"tokens": [1, null]}\n', r"None \(NoneType\)"),
        (b'{"tokens": [1, {"a": 1}]}\n', r"\(dict\)"),
        (b'{"tokens": [2147483648]}\n', "out of range"),
        (b'{"tokens": [-99999999999999999999]}\n', r"\(float\)|out of range"),
    ],
)
def test_parse_bad_lines_name_file_line_byte(line, match):
    with pytest.raises(DataError, match=match) as ei:
        fmt.parse_line(line, "dir/f.bin", 7, 1234)
    msg = str(ei.value)
    assert msg.startswith("dir/f.bin: line 7 (byte 1234): ") and "\n" not in msg


def test_parse_count_mismatch_is_stale_meta():
    with pytest.raises(DataError, match="has 2 tokens but the meta says 3; the meta is stale"):
        fmt.parse_line(b'{"tokens": [1, 2]}\n', "f.bin", 1, 0, expected=3)


_int_text = st.integers(-3000, 3000).map(str)
_junk = st.sampled_from(
    [
        "-",
        "+1",
        "1.0",
        "1e2",
        "1E2",
        "",
        " ",
        "1 2",
        "--1",
        "1-",
        "true",
        "null",
        '"3"',
        "[1]",
        "0x1",
        "NaN",
        "Infinity",
        "-Infinity",
        "1,",
        "\t4",
        "5\t",
        "\u00a0",
        "01",
        "-01",
        "00",
        "-0",
        "- 5",
        "\x0c",
        "7\x0b",
        " , ",
        "-,",
        "2-3",
        "1/2",
        "1_000",
    ]
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.one_of(_int_text, _int_text, _junk), max_size=8),
    st.sampled_from([",", ", ", " ,"]),
    st.sampled_from(["", "\n", "\r\n", " \n"]),
)
def test_fast_parser_agrees_with_json(items, sep, end):
    """Whatever the fast path accepts, JSON accepts with the same values; the rest errors."""
    line = ('{"tokens": [' + sep.join(items) + "]}" + end).encode()
    try:
        obj = orjson.loads(line)
        toks = obj["tokens"]
        ok = all(type(t) is int and abs(t) <= 2**31 - 1 for t in toks)
    except orjson.JSONDecodeError:
        ok = False
    if ok:
        assert fmt.parse_line(line, "f", 1, 0).tolist() == toks
    else:
        with pytest.raises(DataError):
            fmt.parse_line(line, "f", 1, 0)


# --------------------------------------------------------------------------- build_meta


def test_build_meta_offsets_counts_blank_lines_crlf_and_no_final_newline(tmp_path):
    p = tmp_path / "a.bin"
    lines = [line_bytes([1, 2, 3], b"\r\n"), b"\r\n", line_bytes([], b"\n"), b"   \n", line_bytes([-4, 5], b"")]
    p.write_bytes(b"".join(lines))
    m = fmt.build_meta(p)
    o1 = len(lines[0]) + 2
    o2 = o1 + len(lines[2]) + 4
    assert m.dtype == np.int64 and m.tolist() == [[0, 3], [o1, 0], [o2, 2]]
    fmt.read_meta(_saved(p, m), p, p.stat().st_size)  # its own output validates


def test_build_meta_error_names_real_line_and_byte(tmp_path):
    p = tmp_path / "a.bin"
    good = line_bytes([1, 2])
    p.write_bytes(good + b"\n" + good + b'{"tokens": [1, 2.5]}\n')
    with pytest.raises(DataError, match=rf"a.bin: line 4 \(byte {2 * len(good) + 1}\): .*float"):
        fmt.build_meta(p)


def _saved(p, m):
    fmt.save_meta(m, fmt.meta_path(p))
    return fmt.meta_path(p)


def test_leading_blank_line_is_tolerated(tmp_path):
    """build_meta tolerates blank lines anywhere, so read_meta must accept its output."""
    p = tmp_path / "a.bin"
    p.write_bytes(b"\n\r\n" + line_bytes([1, 2]) + line_bytes([3]))
    m = fmt.build_meta(p)
    assert m[:, 0].tolist()[0] == 3
    assert fmt.read_meta(_saved(p, m), p, p.stat().st_size).tolist() == m.tolist()


def test_blank_only_file_is_tolerated(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"\n  \n")
    m = fmt.build_meta(p)
    assert m.shape == (0, 2)
    assert fmt.read_meta(_saved(p, m), p, p.stat().st_size).shape == (0, 2)


# --------------------------------------------------------------------------- read_meta


def _good(tmp_path, docs=([1, 2, 3], [4, -5], [6])):
    p = tmp_path / "a.bin"
    m = write_bin(p, [list(d) for d in docs])
    return p, fmt.meta_path(p), m


def _read(p, mp):
    return fmt.read_meta(mp, p, p.stat().st_size)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint32, np.uint64])
@pytest.mark.parametrize("extra", [0, 1, 3])
def test_meta_dtypes_and_extra_columns(tmp_path, dtype, extra):
    p, mp, m = _good(tmp_path)
    save_meta(p, m, dtype, extra)
    got = _read(p, mp)
    assert got.dtype == np.int64 and got.tolist() == m.tolist()  # column 1, not the last column


def test_meta_not_npy(tmp_path):
    p, mp, _ = _good(tmp_path)
    mp.write_bytes(b"this is not numpy")
    with pytest.raises(DataError, match=r"a.bin.meta: not a readable numpy .npy meta file"):
        _read(p, mp)


def test_meta_truncated_npy(tmp_path):
    p, mp, _ = _good(tmp_path)
    mp.write_bytes(mp.read_bytes()[:-5])
    with pytest.raises(DataError, match="not a readable numpy"):
        _read(p, mp)


def test_meta_pickled_object_array_is_refused(tmp_path):
    p, mp, _ = _good(tmp_path)
    np.save(mp.open("wb"), np.array([[0, 1]], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="not a readable numpy"):
        _read(p, mp)


@pytest.mark.parametrize(
    "arr",
    [
        np.array([0, 10, 20]),
        np.zeros((3, 1), np.int64),
        np.zeros((3, 2, 2), np.int64),
        np.int64(0),
    ],
    ids=["1-D", "one-column", "3-D", "scalar"],
)
def test_meta_wrong_shape(tmp_path, arr):
    p, mp, _ = _good(tmp_path)
    np.save(mp.open("wb"), arr)
    with pytest.raises(DataError, match=r"meta must have shape \(N, >=2\)"):
        _read(p, mp)


@pytest.mark.parametrize("dtype", [np.float64, np.bool_])
def test_meta_non_integer_dtype(tmp_path, dtype):
    p, mp, m = _good(tmp_path)
    np.save(mp.open("wb"), m.astype(dtype))
    with pytest.raises(DataError, match="meta must hold integers"):
        _read(p, mp)


def test_meta_decreasing_offsets(tmp_path):
    p, mp, m = _good(tmp_path)
    m2 = m.copy()
    m2[[1, 2]] = m2[[2, 1]]
    save_meta(p, m2)
    with pytest.raises(DataError, match=r"row 2: byte offset \d+ is not increasing"):
        _read(p, mp)


def test_meta_repeated_offset(tmp_path):
    p, mp, m = _good(tmp_path)
    m2 = m.copy()
    m2[2, 0] = m2[1, 0]
    save_meta(p, m2)
    with pytest.raises(DataError, match="row 2: .* not increasing"):
        _read(p, mp)


def test_meta_negative_offset(tmp_path):
    p, mp, m = _good(tmp_path)
    m2 = m.copy()
    m2[1, 0] = -7
    save_meta(p, m2)
    with pytest.raises(DataError, match="row 1: byte offset -7 is negative"):
        _read(p, mp)


def test_meta_negative_count(tmp_path):
    p, mp, m = _good(tmp_path)
    m2 = m.copy()
    m2[1, 1] = -1
    save_meta(p, m2)
    with pytest.raises(DataError, match="row 1: negative token count"):
        _read(p, mp)


def test_meta_first_offset_not_zero(tmp_path):
    p, mp, m = _good(tmp_path)
    save_meta(p, m[1:])
    with pytest.raises(DataError, match="a.bin.meta: "):
        _read(p, mp)


def test_meta_int32_offsets_wrapped_past_2gib(tmp_path):
    """A >2 GiB file indexed with int32 offsets: they wrap negative. Faked with a small file."""
    p, mp, _m = _good(tmp_path)
    wrapped = np.array([[0, 3], [2**31 - 8, 2], [2**31 + 100, 1]], dtype=np.int64).astype(np.int32)
    assert wrapped[2, 0] < 0
    np.save(mp.open("wb"), wrapped)
    with pytest.raises(
        DataError, match=r"row 2: byte offset -\d+ is negative \(int32 offsets overflowed past 2 GiB\?\)"
    ):
        _read(p, mp)


def test_meta_offset_past_end_of_file(tmp_path):
    p, mp, m = _good(tmp_path)
    m2 = m.copy()
    m2[2, 0] = p.stat().st_size + 10
    save_meta(p, m2)
    with pytest.raises(DataError, match="past the end of"):
        _read(p, mp)


def test_meta_stale_appended_lines(tmp_path):
    p, mp, _ = _good(tmp_path)
    with p.open("ab") as f:
        f.write(line_bytes([7, 8]))
    with pytest.raises(DataError, match=r"more lines than the meta's 3 \(appended after indexing\?\)"):
        _read(p, mp)


def test_meta_stale_truncated_file(tmp_path):
    p, mp, m = _good(tmp_path)
    p.write_bytes(p.read_bytes()[: m[2, 0] - 1])  # drop the last line
    with pytest.raises(DataError, match="past the end"):
        _read(p, mp)


def test_meta_stale_rewritten_lines_boundary(tmp_path):
    p, mp, _m = _good(tmp_path)
    p.write_bytes(line_bytes([1, 2, 3, 4, 5, 6]) + line_bytes([1]) + line_bytes([1]))
    with pytest.raises(DataError, match="does not start a line"):
        _read(p, mp)


def test_meta_with_no_rows_for_nonempty_file(tmp_path):
    p, mp, _ = _good(tmp_path)
    save_meta(p, np.zeros((0, 2), np.int64))
    with pytest.raises(DataError, match="meta lists no lines"):
        _read(p, mp)


def test_meta_for_empty_file(tmp_path):
    p = tmp_path / "e.bin"
    p.write_bytes(b"")
    save_meta(p, np.zeros((0, 2), np.int64))
    assert fmt.read_meta(fmt.meta_path(p), p, 0).shape == (0, 2)


def test_save_meta_is_atomic_int64(tmp_path):
    p = tmp_path / "x.bin.meta"
    fmt.save_meta(np.array([[0, 1]], np.int32), p)
    got = np.load(p)
    assert got.dtype == np.int64 and got.tolist() == [[0, 1]]
    assert [q.name for q in tmp_path.iterdir()] == ["x.bin.meta"]  # no temp file left


def test_meta_stale_last_line_truncated_mid_line(tmp_path):
    p, mp, _ = _good(tmp_path)
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(
        DataError,
        match=r"a.bin.meta: the last line of .*a.bin does not match the meta \(line 3 \(byte \d+\): malformed JSON",
    ):
        _read(p, mp)


def test_meta_stale_last_line_rewritten(tmp_path):
    p, mp, _ = _good(tmp_path)
    p.write_bytes(p.read_bytes().replace(b"[6]", b"[6, 7, 8]"))
    with pytest.raises(DataError, match="does not match the meta .*has 3 tokens but the meta says 1"):
        _read(p, mp)
