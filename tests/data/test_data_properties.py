"""Property tests: packs and samples against a token-by-token reference implementation."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokentrain.data.dataset import DataSettings, build_dataset
from tokentrain.data.index import FILE, LINE
from tokentrain.errors import DataError

from .helpers import as_lists, line_bytes, ref_packs, ref_unpacked, write_bin

_doc = st.one_of(
    st.lists(st.integers(-30, 30), max_size=14),  # random signs, zeros, empty documents
    st.lists(st.integers(-30, -1), min_size=1, max_size=8),  # all-negative
    st.lists(st.sampled_from([0, -1, 1]), min_size=1, max_size=6),  # dense in zeros
)
_files = st.lists(st.lists(_doc, max_size=7), min_size=1, max_size=3)
_layout = st.fixed_dictionaries(
    {
        "newline": st.sampled_from([b"\n", b"\r\n"]),
        "meta": st.booleans(),
        "spaced": st.booleans(),
        "blank": st.booleans(),
    }
)
_settings = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _write(root: Path, files, layout) -> None:
    for i, docs in enumerate(files):
        lines = []
        for d in docs:
            lines.append(line_bytes(d, b"", spaced=layout["spaced"]))
            if layout["blank"]:
                lines.append(b"")
        write_bin(root / f"f{i}.bin", None, raw_lines=lines, newline=layout["newline"], meta=layout["meta"])


def _table_docs(ds, files):
    """The documents in the order of the dataset's table, looked up by (file, line)."""
    return [files[int(f)][int(line)] for f, line in np.asarray(ds.index.docs)[:, [FILE, LINE]]]


def _kept(files, min_length):
    return [d for docs in files for d in docs if len(d) >= max(1, min_length)]


def _check_structure(s, L, cut):
    ids, labels, pos, cu = (np.asarray(s[k]) for k in ("input_ids", "labels", "position_ids", "cu_seqlens"))
    n = len(ids)
    assert len(labels) == len(pos) == n and (n == L if cut else 1 <= n <= L)
    assert (ids >= 0).all() and ((labels == -100) | (labels >= 0)).all()
    assert cu[0] == 0 and cu[-1] == n and (np.diff(cu) > 0).all()
    starts = np.zeros(n, bool)
    starts[cu[:-1]] = True
    assert ((pos == 0) == starts).all()  # positions restart exactly at fragment starts
    seg = np.repeat(cu[:-1], np.diff(cu))
    assert (pos == np.arange(n) - seg).all()


@_settings
@given(
    files=_files,
    layout=_layout,
    L=st.integers(1, 16),
    shuffle=st.booleans(),
    seed=st.integers(0, 3),
    min_length=st.integers(0, 4),
    zero_is_target=st.booleans(),
    drop_last=st.booleans(),
    data=st.data(),
)
def test_packs_match_reference(files, layout, L, shuffle, seed, min_length, zero_is_target, drop_last, data):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        _write(root, files, layout)
        cfg = DataSettings(
            str(root),
            max_length=L,
            shuffle=shuffle,
            seed=seed,
            min_length=min_length,
            zero_is_target=zero_is_target,
            drop_last_pack=drop_last,
            cache_dir=str(Path(tmp) / "cache"),
        )
        kept = _kept(files, min_length)
        total = sum(map(len, kept))
        if not kept or (drop_last and total < L):
            with pytest.raises(DataError):
                build_dataset(cfg)
            return
        ds = build_dataset(cfg)
        table = _table_docs(ds, files)
        assert sorted(map(tuple, table)) == sorted(map(tuple, kept))  # every kept document once
        if not shuffle:
            assert table == kept  # file order, then line order
        packs, tail = ref_packs(table, L, zero_is_target, drop_last)
        assert len(ds) == len(packs) == (total // L if drop_last else -(-total // L))
        got = [as_lists(ds[k]) for k in range(len(ds))]
        flat = [t for s in got for t in s["input_ids"]] + tail
        assert flat == [abs(t) for d in table for t in d]  # tokens conserved
        for k, (g, ref) in enumerate(zip(got, packs)):
            assert g == ref, f"pack {k}"
            _check_structure(ds[k], L, cut=drop_last or k < len(ds) - 1)
        # random access (as a shuffled sampler reads), repeats and negative indices included
        for k in data.draw(st.lists(st.integers(-len(ds), len(ds) - 1), max_size=12), label="access order"):
            assert as_lists(ds[k]) == packs[k]


@_settings
@given(
    files=_files,
    layout=_layout,
    L=st.integers(1, 10),
    shuffle=st.booleans(),
    min_length=st.integers(0, 3),
    zero_is_target=st.booleans(),
    data=st.data(),
)
def test_unpacked_samples_match_reference(files, layout, L, shuffle, min_length, zero_is_target, data):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        _write(root, files, layout)
        cfg = DataSettings(
            str(root),
            max_length=L,
            pack_to_max_length=False,
            shuffle=shuffle,
            min_length=min_length,
            zero_is_target=zero_is_target,
            cache_dir=str(Path(tmp) / "cache"),
        )
        kept = _kept(files, min_length)
        if not kept:
            with pytest.raises(DataError, match="no documents left"):
                build_dataset(cfg)
            return
        ds = build_dataset(cfg)
        table = _table_docs(ds, files)
        assert sorted(map(tuple, table)) == sorted(map(tuple, kept))
        assert len(ds) == len(kept)
        for k, doc in enumerate(table):
            assert as_lists(ds[k]) == ref_unpacked(doc, L, zero_is_target)
            _check_structure(ds[k], L, cut=False)
        for k in data.draw(st.lists(st.integers(-len(ds), len(ds) - 1), max_size=12), label="access order"):
            assert as_lists(ds[k]) == ref_unpacked(table[k], L, zero_is_target)
