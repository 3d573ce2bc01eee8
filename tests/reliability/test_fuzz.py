"""Fuzzing what the data layer's own property tests (tests/data/test_data_properties.py,
test_data_sampler.py, test_data_read_lists.py) leave out: random bytes into the `.bin` line
parser and into meta loading (only clean DataErrors, no crash, no hang), and the whole path
dataset -> per-rank sampler -> collated batches, for random documents, max_length, batch and
rank splits: tokens conserved, targets and positions as specified, every document taken by
exactly one rank per epoch."""

from __future__ import annotations

import json
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokentrain.data import format as fmt
from tokentrain.errors import DataError

_fast = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class _Deadline:
    """A hang is a failure: SIGALRM after `seconds`."""

    def __init__(self, seconds: int = 5):
        self.seconds = seconds

    def __enter__(self):
        def boom(*_):
            raise TimeoutError("hung")

        self.old = signal.signal(signal.SIGALRM, boom)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)


def _json_ints(line: bytes):
    """What a line means per the format: the list of ints under "tokens", else None."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    toks = obj.get("tokens") if isinstance(obj, dict) else None
    if not isinstance(toks, list) or not all(type(t) is int and -(2**63) <= t < 2**63 for t in toks):
        return None
    return toks


_line_bytes = st.one_of(
    st.binary(max_size=80),
    st.builds(
        lambda toks, junk: ('{"tokens": [' + ", ".join(map(str, toks)) + "]}").encode() + junk,
        st.lists(st.integers(-(2**70), 2**70), max_size=8),
        st.binary(max_size=4),
    ),
    st.builds(
        lambda a, b: a + b,
        st.sampled_from([b'{"tokens": [', b'{"tokens":', b"{", b"[1, 2]", b'{"tokens": [1, 2]}']),
        st.binary(max_size=20),
    ),
)


@_fast
@given(line=_line_bytes, expected=st.one_of(st.none(), st.integers(0, 10)))
def test_parse_line_on_random_bytes_gives_tokens_or_a_clean_error(line, expected):
    with _Deadline():
        try:
            got = fmt.parse_line(line, "f.bin", 7, 123, expected)
        except DataError as e:
            msg = str(e)
            assert msg.startswith("f.bin: line 7 (byte 123)") and "\n" not in msg, msg
            return
    want = _json_ints(line)
    assert want is not None, (line, got)
    assert got.tolist() == want and got.dtype == np.int64
    assert expected is None or len(want) == expected


_npy_header = np.lib.format.magic(1, 0)


@_fast
@given(
    blob=st.one_of(
        st.binary(max_size=200),
        st.builds(lambda b: _npy_header + b, st.binary(max_size=200)),  # a real magic, junk after it
        st.builds(
            lambda arr, cut: arr[:cut], st.just(None).map(lambda _: _valid_meta()), st.integers(0, 200)
        ),  # truncated
    ),
    data_file=st.sampled_from([b'{"tokens": [1, 2]}\n{"tokens": [3]}\n', b"", b"\n\n"]),
)
def test_read_meta_on_random_bytes_gives_a_table_or_a_clean_error(blob, data_file):
    with tempfile.TemporaryDirectory() as d:
        data, meta = Path(d) / "a.bin", Path(d) / "a.bin.meta"
        data.write_bytes(data_file)
        meta.write_bytes(blob)
        with _Deadline():
            try:
                got = fmt.read_meta(meta, data, len(data_file))
            except DataError as e:
                assert str(e).startswith(str(meta)) and "\n" not in str(e), str(e)
                return
        assert got.dtype == np.int64 and got.ndim == 2 and got.shape[1] == 2


def _valid_meta() -> bytes:
    import io

    b = io.BytesIO()
    np.save(b, np.array([[0, 2], [19, 1]], dtype=np.int64))
    return b.getvalue()


# --------------------------------------------------------------------------- dataset -> ranks -> batches

_doc = st.lists(st.integers(-40, 40), min_size=1, max_size=12)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    files=st.lists(st.lists(_doc, min_size=1, max_size=12), min_size=1, max_size=3),
    L=st.integers(1, 16),
    packed=st.booleans(),
    world=st.integers(1, 4),
    batch=st.integers(1, 3),
    seed=st.integers(0, 5),
    epoch=st.integers(0, 2),
    zero_is_target=st.booleans(),
)
def test_every_document_goes_to_exactly_one_rank_and_batches_keep_tokens(
    files, L, packed, world, batch, seed, epoch, zero_is_target, tmp_path_factory
):
    from tokentrain.data.batch import collate
    from tokentrain.data.dataset import DataSettings, build_dataset
    from tokentrain.data.sampler import ResumableSampler

    root = tmp_path_factory.mktemp("fz")
    for i, docs in enumerate(files):
        (root / f"f{i}.bin").write_text("".join(json.dumps({"tokens": d}) + "\n" for d in docs))
    try:
        ds = build_dataset(
            DataSettings(
                folder=str(root),
                max_length=L,
                pack_to_max_length=packed,
                seed=seed,
                zero_is_target=zero_is_target,
                cache_dir=str(root / "cache"),
            )
        )
    except DataError as e:
        assert "fewer than one pack" in str(e)
        return
    if len(ds) < world:
        with pytest.raises(DataError):
            ResumableSampler(len(ds), 0, world, seed=seed)
        return
    taken: dict[tuple[str, int], int] = {}
    samples_seen = []
    for rank in range(world):
        s = ResumableSampler(len(ds), rank, world, seed=seed)
        s.set_epoch(epoch)
        ids = list(s)
        for lo in range(0, len(ids) - batch + 1, batch):
            samples = [ds[k] for k in ids[lo : lo + batch]]
            b = collate(samples)
            for row, smp in enumerate(samples):
                n = len(smp["input_ids"])
                # The batch holds the sample's tokens, targets and positions exactly; padding has no target.
                assert b.input_ids[row, :n].tolist() == list(smp["input_ids"])
                assert b.labels[row, :n].tolist() == list(smp["labels"])
                assert b.position_ids[row, :n].tolist() == list(smp["position_ids"])
                assert (b.labels[row, n:] == -100).all()
            assert b.indices == [int(k) for k in ids[lo : lo + batch]]
        for k in ids:
            samples_seen.append(int(k))
            for src in set(ds.sources(int(k))):
                taken.setdefault(src, set()).add(rank)
    # Each sample to at most one rank, at most world-1 of them left out of the epoch.
    assert len(samples_seen) == len(set(samples_seen)) and len(ds) - len(samples_seen) < world
    # Every document of a sample is taken by exactly one rank (a document split across two
    # packs may be seen by two); unpacked, a sample is one document.
    for src, ranks in taken.items():
        assert len(ranks) == 1 or packed, (src, ranks)
    if not packed:
        assert len(taken) == len(samples_seen)
    # Tokens conserved: packed, the epoch's samples are disjoint max_length cuts of the stream.
    total = sum(len(d) for docs in files for d in docs)
    if packed:
        assert len(ds) == total // L
        got = sorted(k for k in samples_seen)
        for k in got:
            smp = ds[k]
            assert len(smp["input_ids"]) == L
            pos, cu = smp["position_ids"], smp["cu_seqlens"]
            seg = np.repeat(cu[:-1], np.diff(cu))
            assert (pos == np.arange(L) - seg).all()  # positions restart at every document
    else:
        for k in samples_seen:
            smp = ds[k]
            ((f, line),) = ds.sources(k)
            doc = files[int(Path(f).stem[1:])][line - 1]
            assert list(smp["input_ids"]) == [abs(t) for t in doc[:L]]  # the document itself, truncated
            assert (smp["position_ids"] == np.arange(len(smp["input_ids"]))).all()
            nxt = doc[1 : L + 1] + ([] if len(doc) > L else [None])
            want = [(t if (t is not None and (t >= 0 if zero_is_target else t > 0)) else -100) for t in nxt][
                : len(smp["labels"])
            ]
            if len(doc) <= L:
                want[-1] = -100  # the document's last token has no target
            assert list(smp["labels"]) == want
