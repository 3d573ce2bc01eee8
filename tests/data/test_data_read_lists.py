"""fastjson.read_lists, the pack reader's fast path: numpy reads several lines' lists in one
call and a vectorised length test confirms the reading. Whatever it accepts must be exactly
JSON's reading of every line, with the count the meta says; anything else returns None (the
reader then looks at each line alone and raises the precise error)."""

from __future__ import annotations

import json

import numpy as np
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from tokentrain.data import fastjson

_LIMIT = 2**31 - 1
_JUNK = st.sampled_from(
    [
        "+",
        "0",
        "-",
        ",",
        " ",
        "\t",
        "\r",
        "\x0b",
        "\x0c",
        "00",
        "-0",
        "--",
        ", ",
        " ,",
        ".",
        "e",
        "]",
        "[",
        "0,",
        ",0",
        "-,",
        "2147483648",
        "-2147483648",
        "99999999999",
        "\x00",
    ]
)


@st.composite
def _line(draw):
    """A line of token ids, perhaps spoiled by a junk edit, and a meta count, perhaps off by one."""
    vals = draw(
        st.lists(
            st.integers(-3000, 3000) | st.integers(-_LIMIT, _LIMIT) | st.integers(-(2**40), 2**40),
            min_size=1,
            max_size=8,
        )
    )
    body = draw(st.sampled_from([",", ", "])).join(map(str, vals))
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2]))):
        pos, junk = draw(st.integers(0, len(body))), draw(_JUNK)
        body = body[:pos] + junk + body[pos + draw(st.sampled_from([0, len(junk)])) :]
    count = max(1, len(vals) + draw(st.sampled_from([0, 0, 0, -1, 1])))
    return ('{"tokens":' + draw(st.sampled_from(["[", " ["])) + body + "]}\n").encode(), count


@settings(max_examples=800, deadline=None)
@given(st.lists(_line(), min_size=1, max_size=4))
def test_read_lists_accepts_only_exact_json_with_the_meta_counts(lines):
    texts = [fastjson.list_text(line) for line, _ in lines]
    if any(t is None for t in texts):
        return
    counts = [c for _, c in lines]
    arr = fastjson.read_lists(texts, counts)
    if arr is None:
        return
    assert arr.dtype == np.int64 and len(arr) == sum(counts)
    pos = 0
    for line, count in lines:
        ref = orjson.loads(line)["tokens"]  # accepted lines are JSON...
        assert all(type(t) is int and abs(t) <= _LIMIT for t in ref)
        assert len(ref) == count and arr[pos : pos + count].tolist() == ref  # ...read exactly, with the meta's count
        pos += count


def test_read_lists_takes_compact_and_json_dumps_lines_with_zeros():
    docs = [[1, -5, 0, 2147483647, -2147483647, 2], [0], [7, 0, -0, 3]]
    lines = [
        orjson.dumps({"tokens": docs[0]}) + b"\n",
        json.dumps({"tokens": docs[1]}).encode() + b"\n",
        json.dumps({"tokens": docs[2]}).encode() + b"\n",
    ]
    texts = [fastjson.list_text(line) for line in lines]
    arr = fastjson.read_lists(texts, [len(d) for d in docs])
    if fastjson.REFUSES_JUNK:  # the fast path needs a numpy that refuses junk (>= 2.3)
        assert arr is not None and arr.tolist() == [t for d in docs for t in d]
    else:
        assert arr is None


def test_read_lists_reads_json_dumps_lines_in_place_and_refuses_other_spacing():
    docs = [[1, -5, 2147483647, 2], [7, -3], [4]]
    lines = [json.dumps({"tokens": d}).encode() + b"\n" for d in docs]
    texts = [fastjson.list_text(line) for line in lines]
    assert all(isinstance(t, memoryview) for t in texts)  # no copy of the line
    got = fastjson.read_lists(texts, [len(d) for d in docs])
    if fastjson.REFUSES_JUNK:
        assert got is not None and got.tolist() == [t for d in docs for t in d]
    for odd in (
        b'{"tokens": [1,  2]}\n',
        b'{"tokens": [1 , 2]}\n',
        b'{"tokens": [- 1, 2]}\n',
        b'{"tokens": [1, 2 ]}\n',
    ):
        assert fastjson.read_lists([fastjson.list_text(odd)], [2]) is None  # left to the line-by-line path
    for odd in (  # a field of spaces alone reads 0 in numpy; the leading zero makes up its length
        b'{"tokens":[1, ,00]}\n',
        b'{"tokens": [-10000, -10000, -100002, ,00]}\n',
        b'{"tokens": [0, ,00]}\n',
    ):
        n = len(np.fromstring(fastjson.list_text(odd).tobytes(), dtype=np.int64, sep=","))
        assert fastjson.read_lists([fastjson.list_text(odd)], [n]) is None
        assert (
            fastjson.read_lists([fastjson.list_text(b'{"tokens": [5, 0]}\n'), fastjson.list_text(odd)], [2, n]) is None
        )
