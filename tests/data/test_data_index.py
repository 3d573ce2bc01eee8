"""data/index.py: metas built on demand, the document table, its on-disk cache and lock."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pytest

from tokentrain.data import format as fmt
from tokentrain.data import index as idx
from tokentrain.data.dataset import DataSettings, build_dataset
from tokentrain.errors import DataError

from .helpers import line_bytes, write_bin

DOCS_A = [[1, 2, 3], [4, -5], [], [6], [7, 8, 9, 10]]
DOCS_B = [[-1, -2], [11, 12, 13], [14]]


def _dataset(root: Path, meta=True) -> list[Path]:
    write_bin(root / "a.bin", DOCS_A, meta=meta)
    write_bin(root / "sub" / "b.bin", DOCS_B, meta=meta)
    (root / "sub" / "empty.bin").write_bytes(b"")
    return fmt.discover_files(root)


def _table(index, docs_by_file):
    """The documents of the table, by its (file, line) columns."""
    return [docs_by_file[int(f)][int(line)] for f, line in index.docs[:, [idx.FILE, idx.LINE]]]


# --------------------------------------------------------------------------- metas


def test_missing_meta_is_built_beside_and_logged(tmp_path, info_logs):
    files = _dataset(tmp_path, meta=False)
    index = idx.build_index(files, shuffle=False)
    assert index.stats.built_metas == 2  # the empty file needs none
    assert fmt.meta_path(files[0]).exists() and fmt.meta_path(files[1]).exists()
    assert not fmt.meta_path(files[2]).exists()
    assert "no meta; built a.bin.meta (5 lines)" in info_logs.text
    assert np.load(fmt.meta_path(files[0])).tolist() == write_bin(tmp_path / "ref.bin", DOCS_A, meta=False).tolist()


def _deny_in_folder(monkeypatch, folder: Path):
    """Simulate a read-only dataset folder: saving a meta inside it fails like EACCES."""
    real = fmt.save_meta
    folder = folder.resolve()

    def save_meta(meta, path):
        if folder in Path(path).resolve().parents:
            raise PermissionError(13, "Permission denied", str(path))
        return real(meta, path)

    monkeypatch.setattr(fmt, "save_meta", save_meta)


def test_missing_meta_in_read_only_folder_goes_to_cache(tmp_path, cache_dir, monkeypatch, info_logs):
    data = tmp_path / "ro"
    files = _dataset(data, meta=False)
    _deny_in_folder(monkeypatch, data)
    ds = build_dataset(DataSettings(str(data), max_length=4, shuffle=False))
    assert not list(data.rglob("*.meta"))
    cached = sorted((cache_dir / "meta").iterdir(), key=lambda p: p.name.split("-", 1)[1])
    assert [p.name.split("-", 1)[1] for p in cached] == ["a.bin.meta", "b.bin.meta"]
    assert "folder is read-only; built it into" in info_logs.text
    assert ds[0]["input_ids"].tolist() == [1, 2, 3, 4]

    # Reopening uses the cached metas: nothing is parsed again.
    calls = []
    monkeypatch.setattr(fmt, "build_meta", calls.append)
    assert idx.ensure_meta(files[0]) == cached[0]
    build_dataset(DataSettings(str(data), max_length=4, shuffle=False, seed=1))
    assert calls == []


def test_cached_meta_is_rebuilt_when_the_file_is_newer(tmp_path, cache_dir, monkeypatch):
    data = tmp_path / "ro"
    files = _dataset(data, meta=False)
    _deny_in_folder(monkeypatch, data)
    first = idx.ensure_meta(files[0])
    with files[0].open("ab") as f:
        f.write(line_bytes([42, 43]))
    st = first.stat()
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = idx.ensure_meta(files[0])
    assert again == first and len(np.load(again)) == 6


def test_read_only_folder_for_real(tmp_path, cache_dir):
    data = tmp_path / "ro"
    files = _dataset(data, meta=False)
    for d in (data, data / "sub"):
        d.chmod(0o555)
    try:
        if os.access(data, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes (covered by the monkeypatched test)")
        idx.build_index(files)
        assert not list(data.rglob("*.meta")) and len(list((cache_dir / "meta").iterdir())) == 2
    finally:
        for d in (data, data / "sub"):
            d.chmod(0o755)


# --------------------------------------------------------------------------- table


def test_table_columns_and_file_order(tmp_path):
    files = _dataset(tmp_path)
    index = idx.build_index(files, shuffle=False)
    kept = [d for d in DOCS_A if d] + DOCS_B
    assert _table(index, [DOCS_A, DOCS_B]) == kept
    assert index.lengths().tolist() == [len(d) for d in kept]
    assert index.ends.tolist() == np.cumsum([len(d) for d in kept]).tolist()
    # offsets and byte lengths point at the lines
    data = [f.read_bytes() for f in files]
    for f, _line, off, nb in index.docs.tolist():
        assert data[f][off : off + nb].endswith(b"\n") and data[f][off - 1 : off] in (b"", b"\n")
    assert index.docs.dtype == np.int64 and index.docs.shape == (len(kept), 4)


def test_min_length_and_empty_documents_are_dropped_and_counted(tmp_path, info_logs):
    files = _dataset(tmp_path)
    index = idx.build_index(files, min_length=3, shuffle=False)
    assert _table(index, [DOCS_A, DOCS_B]) == [[1, 2, 3], [7, 8, 9, 10], [11, 12, 13]]
    s = index.stats
    assert (s.files, s.empty_files, s.documents, s.empty_documents, s.short_documents, s.tokens) == (3, 1, 8, 1, 4, 10)
    assert "dropped 4 document(s) shorter than min_length=3" in info_logs.text
    assert "dropped 1 document(s) with no tokens" in info_logs.text
    assert "skipped 1 empty data file(s)" in info_logs.text


def test_min_length_zero_still_drops_empty_documents(tmp_path):
    index = idx.build_index(_dataset(tmp_path), min_length=0, shuffle=False)
    assert index.stats.empty_documents == 1 and index.stats.short_documents == 0
    assert [] not in _table(index, [DOCS_A, DOCS_B])


def test_nothing_left(tmp_path):
    files = _dataset(tmp_path)
    with pytest.raises(DataError, match="no documents left"):
        idx.build_index(files, min_length=100)


def test_shuffle_is_seeded_permutation_of_the_kept_documents(tmp_path):
    files = []
    for i in range(4):
        files.append(tmp_path / f"{i}.bin")
        write_bin(files[-1], [[100 * i + j + 1] * (j % 3 + 1) for j in range(25)])
    base = idx.build_index(files, shuffle=False)
    a1, a2 = idx.build_index(files, seed=1), idx.build_index(files, seed=1)
    b = idx.build_index(files, seed=2)
    key = lambda ix: [tuple(r) for r in ix.docs[:, :2].tolist()]  # noqa: E731
    assert key(a1) == key(a2)
    assert key(a1) != key(b) != key(base)
    assert sorted(key(a1)) == sorted(key(b)) == key(base)  # same documents, all files mixed
    assert len({f for f, _ in key(a1)[:20]}) > 1
    assert a1.ends.tolist() == np.cumsum(a1.lengths()).tolist()


# --------------------------------------------------------------------------- cache


def _count_builds(monkeypatch):
    calls = []
    real = idx._layout

    def counted(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(idx, "_layout", counted)
    return calls


def test_second_open_hits_the_cache_memory_mapped(tmp_path, cache_dir, monkeypatch):
    files = _dataset(tmp_path)
    expected = idx.build_index(files, seed=3).docs.tolist()
    builds = _count_builds(monkeypatch)
    first = idx.open_index(files, seed=3)
    second = idx.open_index(files, seed=3)
    assert len(builds) == 1
    assert first.path == second.path and first.path.parent == cache_dir / "index"
    for ix in (first, second):
        assert isinstance(ix.docs, np.memmap) and isinstance(ix.ends, np.memmap)
    assert second.docs.tolist() == expected
    assert vars(second.stats) == vars(first.stats) and second.stats.empty_files == 1
    assert json.loads((first.path / "info.json").read_text())["files"] == [str(p) for p in files]
    # rebuild=True builds again, into the same key
    third = idx.open_index(files, seed=3, rebuild=True)
    assert len(builds) == 2 and third.path == first.path


def test_read_only_open_writes_nothing_and_maps_an_existing_entry(tmp_path, cache_dir):
    """write=False (`tokentrain plan`): no meta, cache entry or lock is written; the table is the
    one a run builds, and a run's cached entry is mapped when there is one."""
    files = _dataset(tmp_path / "d", meta=False)
    expected = idx.build_index(files, seed=3, write=False)
    assert not list((tmp_path / "d").rglob("*.meta")) and not any(cache_dir.iterdir())
    peeked = idx.open_index(files, seed=3, write=False)
    assert not list((tmp_path / "d").rglob("*.meta")) and not any(cache_dir.iterdir())
    assert peeked.path is None and peeked.docs.tolist() == expected.docs.tolist()
    run = idx.open_index(files, seed=3)  # writes the metas and the entry
    again = idx.open_index(files, seed=3, write=False)
    assert again.path == run.path and isinstance(again.docs, np.memmap)
    assert again.docs.tolist() == expected.docs.tolist() and vars(again.stats) == vars(run.stats)


def test_explicit_cache_dir(tmp_path):
    files = _dataset(tmp_path / "d")
    ix = idx.open_index(files, cache_dir=tmp_path / "mycache")
    assert ix.path.parent == tmp_path / "mycache"


@pytest.mark.parametrize(
    "change",
    ["seed", "min_length", "shuffle", "appended_line", "rewritten_same_size", "meta_touched", "file_set", "file_order"],
)
def test_cache_key_changes_with_every_input(tmp_path, monkeypatch, change):
    files = _dataset(tmp_path)
    kw = dict(min_length=1, shuffle=True, seed=0)
    before = idx.open_index(files, **kw).path
    assert idx.open_index(files, **kw).path == before
    if change in ("seed", "min_length"):
        kw[change] = 2
    elif change == "shuffle":
        kw["shuffle"] = False
    elif change == "appended_line":
        with files[1].open("ab") as f:
            f.write(line_bytes([5, 6]))
        fmt.save_meta(fmt.build_meta(files[1]), fmt.meta_path(files[1]))
    elif change == "rewritten_same_size":
        old = files[0].read_bytes()
        new = old.replace(b"[1, 2, 3]", b"[3, 2, 1]")
        assert len(new) == len(old)
        time.sleep(0.01)
        files[0].write_bytes(new)
    elif change == "meta_touched":
        st = fmt.meta_path(files[0]).stat()
        os.utime(fmt.meta_path(files[0]), ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    elif change == "file_set":
        files = files[:1] + files[2:]
    elif change == "file_order":
        files = [files[1], files[0], files[2]]
    builds = _count_builds(monkeypatch)
    after = idx.open_index(files, **kw)
    assert after.path != before and len(builds) == 1


def test_cache_independent_of_working_directory(tmp_path, monkeypatch):
    """The cache key is the resolved path, so the table must not carry cwd-relative paths."""
    (tmp_path / "x" / "data").mkdir(parents=True)
    (tmp_path / "y").mkdir()
    write_bin(tmp_path / "x" / "data" / "a.bin", [[1, 2, 3]])
    write_bin(tmp_path / "y" / "a.bin", [[9, 9, 9]])  # a decoy at the same relative path
    monkeypatch.chdir(tmp_path / "x")
    first = build_dataset(DataSettings("data", max_length=3, shuffle=False))
    assert first[0]["input_ids"].tolist() == [1, 2, 3]
    monkeypatch.chdir(tmp_path)
    second = build_dataset(DataSettings("x/data", max_length=3, shuffle=False))
    assert second[0]["input_ids"].tolist() == [1, 2, 3]
    (tmp_path / "y" / "data").mkdir()
    os.replace(tmp_path / "y" / "a.bin", tmp_path / "y" / "data" / "a.bin")
    os.replace(tmp_path / "y" / "a.bin.meta", tmp_path / "y" / "data" / "a.bin.meta")
    monkeypatch.chdir(tmp_path / "y")
    third = build_dataset(DataSettings(str(tmp_path / "x" / "data"), max_length=3, shuffle=False))
    assert third[0]["input_ids"].tolist() == [1, 2, 3]


def _open_in_child(files, cache, marker_dir, barrier, out):
    os.environ["TOKENTRAIN_CACHE"] = cache
    real = idx._layout

    def slow_build(*a, **k):
        (Path(marker_dir) / f"built-{os.getpid()}").write_text("")
        time.sleep(0.5)  # hold the lock long enough for the other process to wait on it
        return real(*a, **k)

    idx._layout = slow_build
    barrier.wait()
    ix = idx.open_index([Path(f) for f in files], seed=5)
    out.put((str(ix.path), ix.ends.tolist(), isinstance(ix.docs, np.memmap)))


def test_concurrent_opens_build_one_index(tmp_path, cache_dir):
    files = [str(p) for p in _dataset(tmp_path / "d")]
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    markers = tmp_path / "markers"
    markers.mkdir()
    procs = [
        ctx.Process(target=_open_in_child, args=(files, str(cache_dir), str(markers), barrier, out)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(list(markers.iterdir())) == 1  # exactly one process built it
    assert results[0] == results[1] and results[0][2] is True
    built = [p for p in (cache_dir / "index").iterdir() if p.is_dir()]
    assert len(built) == 1 and not [p for p in (cache_dir / "index").iterdir() if p.name.endswith(".tmp")]


def test_interrupted_build_leaves_no_partial_index(tmp_path, cache_dir, monkeypatch):
    files = _dataset(tmp_path)
    real_save = np.save
    calls = []

    def failing_save(path, arr, *a, **k):
        calls.append(path)
        if len(calls) == 1:  # docs.npy is written, ends.npy fails; info.json never comes
            raise OSError(28, "No space left on device")
        return real_save(path, arr, *a, **k)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError):
        idx.open_index(files)
    monkeypatch.setattr(np, "save", real_save)
    assert [p for p in (cache_dir / "index").iterdir() if not p.name.endswith(".lock")] == []
    ix = idx.open_index(files)
    assert len(ix) == 7 and (ix.path / "info.json").exists()


def test_a_meta_built_in_one_read_is_the_meta_of_every_line(tmp_path):
    """ensure_meta reads usual files in one numpy pass (counts from the commas, confirmed): the
    meta must be what a hand count gives, for compact and spaced lines, empty lists, ids 0 and
    negative, no final newline, and (the careful path) blank lines and \\r\\n endings."""
    rng = np.random.default_rng(5)
    cases = []
    for k in range(60):
        docs = [rng.integers(-70000, 70000, int(rng.choice([0, 1, 2, 7, 90]))).tolist() for _ in range(25)]
        lines = [line_bytes(d, b"", spaced=bool(rng.integers(2))) for d in docs]
        if k % 10 == 3:
            lines.insert(5, b"")
        newline = b"\r\n" if k % 10 == 7 else b"\n"
        p = tmp_path / f"f{k}.bin"
        want = write_bin(p, None, raw_lines=lines, meta=False, newline=newline, final_newline=bool(k % 2))
        cases.append((p, want))
    for p, want in cases:
        got = np.load(idx.ensure_meta(p))
        assert np.array_equal(got, want), p
