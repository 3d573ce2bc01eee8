"""data/packing.py + reader.py + batch.py through the public entry, build_dataset."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from tokentrain.data.batch import collate
from tokentrain.data.dataset import DataSettings, build_dataset
from tokentrain.errors import DataError

from .helpers import as_lists, line_bytes, ref_packs, ref_unpacked, write_bin


def _ds(folder, max_length, **kw):
    kw.setdefault("shuffle", False)
    return build_dataset(DataSettings(str(folder), max_length=max_length, **kw))


def _all(ds):
    return [as_lists(ds[k]) for k in range(len(ds))]


def test_cut_mode_by_hand(tmp_path):
    write_bin(tmp_path / "a.bin", [[1, 2, 3], [4, -5, 6, 7]])
    write_bin(tmp_path / "b.bin", [[-8, 9], [10, 0, 11]])
    ds = _ds(tmp_path, 4, drop_last_pack=False)
    assert _all(ds) == [
        {
            "input_ids": [1, 2, 3, 4],
            "labels": [2, 3, -100, -100],
            "position_ids": [0, 1, 2, 0],
            "cu_seqlens": [0, 3, 4],
        },
        # doc [4,-5,6,7] continues; its fragment start keeps position 0 (a restart per fragment)
        {"input_ids": [5, 6, 7, 8], "labels": [6, 7, -100, 9], "position_ids": [0, 1, 2, 0], "cu_seqlens": [0, 3, 4]},
        {
            "input_ids": [9, 10, 0, 11],
            "labels": [-100, -100, 11, -100],
            "position_ids": [0, 0, 1, 2],
            "cu_seqlens": [0, 1, 4],
        },
    ]
    s = ds[1]
    assert s["input_ids"].dtype == s["labels"].dtype == s["position_ids"].dtype == np.int64
    assert s["cu_seqlens"].dtype == np.int32 and s["index"] == 1


def test_cut_edge_keeps_the_real_target(tmp_path):
    write_bin(tmp_path / "a.bin", [[1, 2, 3, 4, 5, 6]])
    ds = _ds(tmp_path, 3)
    assert ds[0]["labels"].tolist() == [2, 3, 4]  # 4 is the target of 3 across the edge
    assert ds[1]["labels"].tolist() == [5, 6, -100]
    write_bin(tmp_path / "a.bin", [[1, 2, 3, -4, 5, 6]])
    ds = _ds(tmp_path, 3)
    assert ds[0]["labels"].tolist() == [2, 3, -100]  # ... unless that next token is not a target


def test_zero_is_target(tmp_path):
    write_bin(tmp_path / "a.bin", [[5, 0, 6, 0], [0, 7]])
    assert _ds(tmp_path, 6)[0]["labels"].tolist() == [-100, 6, -100, -100, 7, -100]
    assert _ds(tmp_path, 6, zero_is_target=True)[0]["labels"].tolist() == [0, 6, 0, -100, 7, -100]


def test_one_document_longer_than_many_packs(tmp_path):
    long = [(-1) ** (i % 5 == 0) * (i + 1) for i in range(53)]  # every 5th token negative
    docs = [[7, 8], long, [-9, 10, 11]]
    write_bin(tmp_path / "a.bin", docs)
    ds = _ds(tmp_path, 6, drop_last_pack=False)
    packs, _ = ref_packs(docs, 6, drop_last=False)
    assert len(ds) == 10 and _all(ds) == packs
    for k in range(1, 8):  # packs entirely inside the long document: one fragment each
        s = ds[k]
        assert s["cu_seqlens"].tolist() == [0, 6] and s["position_ids"].tolist() == list(range(6))
        assert ds.sources(k) == [(str(tmp_path / "a.bin"), 2)]
    assert ds.sources(0) == [(str(tmp_path / "a.bin"), 1), (str(tmp_path / "a.bin"), 2)]
    assert ds.sources(-1) == ds.sources(9) == [(str(tmp_path / "a.bin"), 2), (str(tmp_path / "a.bin"), 3)]


def test_all_negative_document(tmp_path):
    docs = [[1, 2], [-3, -4, -5], [6, 7]]
    write_bin(tmp_path / "a.bin", docs)
    s = _ds(tmp_path, 7)[0]
    assert s["input_ids"].tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert s["labels"].tolist() == [2, -100, -100, -100, -100, 7, -100]
    write_bin(tmp_path / "a.bin", [[-1, -2, -3]])
    s = _ds(tmp_path, 3)[0]
    assert s["labels"].tolist() == [-100] * 3 and s["input_ids"].tolist() == [1, 2, 3]


def test_final_incomplete_pack_is_dropped_and_logged(tmp_path, info_logs):
    write_bin(tmp_path / "a.bin", [[1, 2, 3], [4, 5, 6, 7]])
    ds = _ds(tmp_path, 3)
    assert len(ds) == 2 and "dropped the final incomplete pack (1 of 7 tokens)" in info_logs.text
    with pytest.raises(IndexError):
        ds[2]
    kept = _ds(tmp_path, 3, drop_last_pack=False)
    assert len(kept) == 3 and as_lists(kept[2]) == {
        "input_ids": [7],
        "labels": [-100],
        "position_ids": [0],
        "cu_seqlens": [0, 1],
    }
    assert len(_ds(tmp_path, 7)) == 1  # exact multiple: nothing dropped


def test_fewer_tokens_than_one_pack(tmp_path):
    write_bin(tmp_path / "a.bin", [[1, 2, 3]])
    with pytest.raises(DataError, match="fewer than one pack of max_length=4"):
        _ds(tmp_path, 4)


def test_crlf_blank_lines_and_no_final_newline(tmp_path):
    docs = [[1, -2, 3], [4, 5], [6, 7, -8, 9]]
    raw = [line_bytes(docs[0], b""), b"", line_bytes(docs[1], b""), b"  ", line_bytes(docs[2], b"")]
    write_bin(tmp_path / "a.bin", None, raw_lines=raw, newline=b"\r\n", final_newline=False, meta=False)
    packs, _ = ref_packs(docs, 3)
    assert _all(_ds(tmp_path, 3)) == packs
    write_bin(tmp_path / "b" / "a.bin", None, raw_lines=raw, newline=b"\r\n", meta=True)  # with a hand-made meta
    assert _all(_ds(tmp_path / "b", 3)) == packs


def test_min_length_and_file_order_through_dataset(tmp_path, info_logs):
    write_bin(tmp_path / "b.bin", [[5, 6, 7], [8]])
    write_bin(tmp_path / "a.bin", [[1, 2], [], [3, 4, 5, 6]])
    (tmp_path / "c.bin").write_bytes(b"")
    ds = _ds(tmp_path, 3, min_length=2, drop_last_pack=False)
    packs, _ = ref_packs([[1, 2], [3, 4, 5, 6], [5, 6, 7]], 3, drop_last=False)
    assert _all(ds) == packs


def test_data_order_file_through_dataset(tmp_path):
    write_bin(tmp_path / "a.bin", [[1, 2]])
    write_bin(tmp_path / "sub" / "b.bin", [[3, 4]])
    write_bin(tmp_path / "c.bin", [[5, 6]])
    order = tmp_path / "order.txt"
    order.write_text("sub/b.bin\na.bin\n")
    ds = _ds(tmp_path, 2, data_order_path=str(order))
    assert [s["input_ids"] for s in _all(ds)] == [[3, 4], [1, 2]]


# --------------------------------------------------------------------------- unpacked + collate


def test_unpacked_truncates_and_logs(tmp_path, info_logs):
    docs = [[1, 2, 3, 4, 5, 6], [-7, 8], [9, 10, 11, -12, 13]]
    write_bin(tmp_path / "a.bin", docs)
    ds = _ds(tmp_path, 4, pack_to_max_length=False)
    assert len(ds) == 3
    assert _all(ds) == [ref_unpacked(d, 4) for d in docs]
    assert ds[0]["labels"].tolist() == [2, 3, 4, 5]  # truncated end keeps its real target
    assert "2 of 3 documents are longer than max_length=4 and will be truncated" in info_logs.text


def test_collate_pads_unpacked_rows(tmp_path):
    docs = [[1, 2, 3, 4, 5], [-6, 7], [8, 9, 10]]
    write_bin(tmp_path / "a.bin", docs)
    ds = _ds(tmp_path, 4, pack_to_max_length=False)
    b = collate([ds[0], ds[1], ds[2]])
    assert b.input_ids.tolist() == [[1, 2, 3, 4], [6, 7, 0, 0], [8, 9, 10, 0]]
    assert b.labels.tolist() == [[2, 3, 4, 5], [7, -100, -100, -100], [9, 10, -100, -100]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 1], [0, 1, 2, 0]]
    assert b.cu_seqlens.tolist() == [[0, 4, 4], [0, 2, 4], [0, 3, 4]]
    assert str(b.cu_seqlens.dtype) == "torch.int32" and str(b.input_ids.dtype) == "torch.int64"
    assert b.indices == [0, 1, 2] and b.num_targets == 4 + 1 + 2
    # what the step needs, counted on the host: the targets' flat positions, the largest id, and
    # every row's documents back to back (the padding its own) -- the device computes the same
    from tokentrain.model.varlen import flat_cu_seqlens

    assert b.targets.tolist() == (b.labels.reshape(-1) != -100).nonzero()[:, 0].tolist() == [0, 1, 2, 3, 4, 8, 9]
    assert b.max_token == 10
    flat, longest = flat_cu_seqlens(b.cu_seqlens, 4)
    assert b.doc_bounds.tolist() == flat.tolist() == [0, 4, 6, 8, 11, 12] and b.max_doc == longest == 4
    assert b.doc_bounds.dtype == flat.dtype


def test_collate_packs_needs_no_padding(tmp_path):
    write_bin(tmp_path / "a.bin", [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10, 11, 12]])
    ds = _ds(tmp_path, 4)
    b = collate([ds[0], ds[1], ds[2]])
    assert b.input_ids.shape == (3, 4)
    assert b.cu_seqlens.tolist() == [[0, 3, 4], [0, 4, 4], [0, 4, 4]]
    assert b.labels.tolist() == [as_lists(ds[k])["labels"] for k in range(3)]


# --------------------------------------------------------------------------- files changing under a job


def _built(tmp_path, docs=([1, 2, 3], [4, 5, 6], [7, 8, 9])):
    p = tmp_path / "a.bin"
    write_bin(p, [list(d) for d in docs])
    return p, _ds(tmp_path, 3)


def test_rewritten_same_size_shifted_lines(tmp_path):
    p, ds = _built(tmp_path)
    old = p.read_bytes()
    new = line_bytes([1, 2, 3, 4, 5]) + line_bytes([6]) + line_bytes([7, 8, 9])
    new = new[: len(old) - 1].ljust(len(old) - 1) + b"\n"
    assert len(new) == len(old)
    p.write_bytes(new)
    with pytest.raises(
        DataError,
        match=r"a.bin: line \d \(byte \d+\) "
        r"(is not where the meta says|ends before the meta says|runs on past where the meta says)",
    ):
        [ds[k] for k in range(len(ds))]


@pytest.mark.parametrize("new", [b"[45,   6]", b"[4, 5555]", b"[4,55555]"])
def test_rewritten_same_boundaries_different_count(tmp_path, new):
    p, ds = _built(tmp_path)
    p.write_bytes(p.read_bytes().replace(b"[4, 5, 6]", new))
    with pytest.raises(DataError, match=r"a.bin: line 2 \(byte \d+\): has 2 tokens but the meta says 3"):
        ds[1]


def test_rewritten_different_size(tmp_path):
    p, ds = _built(tmp_path)
    with p.open("ab") as f:
        f.write(line_bytes([10, 11, 12]))
    with pytest.raises(DataError, match=r"a.bin: size is \d+ bytes, was \d+ when indexed"):
        ds[0]


def test_rewritten_in_place_while_open(tmp_path):
    p, ds = _built(tmp_path)
    assert ds[0]["input_ids"].tolist() == [1, 2, 3]  # the file is open now
    old = p.read_bytes()
    with p.open("r+b") as f:  # same inode, same size, lines moved
        f.write(line_bytes([1, 2]) + b" " + old[len(line_bytes([1, 2])) + 1 :])
        f.seek(0)
        f.write(b'{"tokens": [1, 2, 3, 4]}\n{"tokens": [5, 6]}  \n')
    assert len(p.read_bytes()) == len(old)
    with pytest.raises(DataError, match="a.bin"):
        [ds[k] for k in range(len(ds))]


def test_line_start_moved_under_a_running_job(tmp_path):
    """Line 2 still parses where the meta says, but line 1 now runs into it: caught, whichever is read."""
    p = tmp_path / "a.bin"
    write_bin(p, [[1, 2], [3, 4]])
    ds = _ds(tmp_path, 3, pack_to_max_length=False)
    data = bytearray(p.read_bytes())
    data[len(line_bytes([1, 2])) - 1] = ord(" ")  # same size, one line with two objects
    p.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"a.bin: line 2 \(byte 19\) is not where the meta says"):
        ds[1]
    with pytest.raises(DataError, match=r"a.bin: line 1 \(byte 0\)"):
        ds[0]


@pytest.mark.parametrize(
    "bad", [b"[1,  , 2]", b"[1, -, 2]", b"[1, +5, 2]", b"[1, 05, 2]", b"[1, 5, 2,]", b"[1, - 5, 2]", b"[1, 5.0,2]"]
)
@pytest.mark.parametrize("packed", [True, False])
def test_rewritten_line_numpy_would_misread(tmp_path, bad, packed):
    """Same size, same token count by numpy's lenient reading: still a DataError, never a silent 0."""
    p = tmp_path / "a.bin"
    good = b"[1, " + b"5" * (len(bad) - 8) + b", 2]"
    assert len(good) == len(bad)
    write_bin(p, [[7, 8], [9, 10, 11]], meta=False)
    p.write_bytes(p.read_bytes() + b'{"tokens": ' + good + b"}\n" + line_bytes([12, 13]))
    ds = _ds(tmp_path, 4, pack_to_max_length=packed, drop_last_pack=False)
    [ds[k] for k in range(len(ds))]  # fine before
    p.write_bytes(p.read_bytes().replace(good, bad))
    with pytest.raises(DataError, match=r"a.bin: line 3 \(byte \d+\): (malformed JSON|\"tokens\"\[1\] is 5.0)"):
        [ds[k] for k in range(len(ds))]


def test_truncated_after_indexing(tmp_path):
    p, ds = _built(tmp_path)
    p.write_bytes(p.read_bytes()[:-4])
    with pytest.raises(DataError, match="a.bin"):
        _ds(tmp_path, 3)  # a new run: the meta is stale
    with pytest.raises(DataError, match="a.bin"):
        ds[2]  # the running job


def test_file_deleted_after_indexing(tmp_path):
    p, ds = _built(tmp_path)
    p.unlink()
    with pytest.raises(DataError, match="a.bin: cannot open data file"):
        ds[0]


def test_dataset_pickles_without_open_files(tmp_path):
    _p, ds = _built(tmp_path)
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.reader._fds == {} and as_lists(clone[1]) == as_lists(ds[1])


def test_dataloader_fork_workers(tmp_path):
    torch = pytest.importorskip("torch")
    docs = [[i + 1] * (i % 7 + 1) for i in range(40)]
    write_bin(tmp_path / "a.bin", docs)
    ds = _ds(tmp_path, 8)
    ds[0]  # the parent opened the file before forking
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, num_workers=2, collate_fn=collate, multiprocessing_context="fork"
    )
    rows = [row for b in loader for row in b.input_ids.tolist()]
    assert rows == [as_lists(ds[k])["input_ids"] for k in range(len(ds))]
