"""Fast, exact reading of ``{"tokens": [..]}`` lines: the data loader's hot path.

Two readers, both checked to give exactly JSON's reading or nothing (None: the caller
then parses the line strictly with orjson, which names the error):

* `read_lists` (a pack's lines at once): numpy's C text parser (``np.fromstring``, ~3x
  faster than orjson + list->array) reads the joined lists in one call, confirmed by one
  vectorised length test; compact and ``", "``-separated (``json.dumps``) lines read at the
  same speed, the spaced ones without a copy.
* `parse_fast` (one line): ``np.fromstring`` confirmed by `is_canonical`, else the
  vectorised `is_json_int_list`.

numpy's parser also reads text JSON refuses (``+5``, ``01``, empty fields; old numpy stops
quietly at junk); what it reads is used only when shown to be exactly JSON's reading.
"""

from __future__ import annotations

import functools
import itertools
import warnings

import numpy as np

PREFIX = b'{"tokens":'
INT32_LIMIT = 2**31 - 1
_LIST = PREFIX + b"["
_SPACED_LIST = PREFIX + b" ["  # json.dumps
_WS = b" \t\r\n"
_I64 = np.dtype(np.int64)
_EMPTY_BODY = b""


def _fromstring(text) -> np.ndarray:
    """``np.fromstring(text, sep=",")``; old numpy (< 2.3) stops quietly at junk with a
    DeprecationWarning, silenced here only (what it read is checked by the caller)."""
    if REFUSES_JUNK:
        return np.fromstring(text, dtype=_I64, sep=",")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="string or file could not be read to its end")
        return np.fromstring(text, dtype=_I64, sep=",")


def _refuses_junk() -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            np.fromstring(b"1,x", dtype=np.int64, sep=",")
    except ValueError:
        return True  # numpy >= 2.3
    except Exception:
        pass
    return False


REFUSES_JUNK = _refuses_junk()


# --------------------------------------------------------------------------- one line


def parse_fast(line: bytes) -> np.ndarray | None:
    """Canonical ``{"tokens": [..]}`` lines via numpy's C parser; None when unsure."""
    got = read_list(line)
    if got is None:
        return None
    arr, body = got
    if not len(arr) or is_canonical(arr, len(body)):
        return arr
    if len(arr) != body.count(b",") + 1 or b"]" in body or b"." in body or not is_json_int_list(body, len(arr)):
        return None
    if arr.max() > INT32_LIMIT or arr.min() < -INT32_LIMIT:
        return None  # let the strict path judge out-of-range values
    return arr


def read_list(line: bytes, start: int = 0) -> tuple[np.ndarray, bytes] | None:
    """numpy's reading of the list of a ``{"tokens": [..]}`` line (from byte `start`), and the
    list text it read; None when the line is not of that shape or numpy refuses the text.

    Unchecked: numpy also reads text JSON refuses (see `is_json_int_list`); `is_canonical`
    is the cheap check for the common case. Text after a comma loses its spaces first (JSON
    allows them; values and validity do not change), so ``json.dumps`` output reads compact.
    """
    lb, rb = list_brackets(line, start)
    if lb < 0:
        return None
    body = line[lb + 1 : rb]
    if not body.strip(b" \t\r\n"):  # JSON whitespace only
        return np.zeros(0, dtype=np.int64), _EMPTY_BODY
    if b" " in body:
        body = body.replace(b", ", b",")
    try:
        return _fromstring(body), body
    except (ValueError, DeprecationWarning):
        return None


def list_brackets(line: bytes, start: int = 0) -> tuple[int, int]:
    """Where the ``[`` and ``]`` of a ``{"tokens": [..]}`` line (from byte `start`) are;
    (-1, -1) when the line is not of that shape."""
    if not line.startswith(PREFIX, start):
        return -1, -1
    if line.endswith(b"]}\n"):
        rb = len(line) - 3
    else:
        rb = line.rfind(b"]")
        if rb == -1 or line[rb + 1 :].rstrip() != b"}":
            return -1, -1
    lb = line.find(b"[", start + len(PREFIX), rb)
    if lb == -1 or (lb != start + len(PREFIX) and line[start + len(PREFIX) : lb].strip()):
        return -1, -1
    return lb, rb


# --------------------------------------------------------------------------- a pack's lines


def list_text(line: bytes, start: int = 0):
    """The text between the brackets of a ``{"tokens": [..]}`` line (from byte `start`), as a
    memoryview of the line, for `read_lists`; None when the line is not of that shape or the
    list is empty."""
    if line.endswith(b"]}\n") and line.startswith(_LIST, start):  # the usual lines
        lb, rb = start + len(PREFIX), len(line) - 3
    elif line.endswith(b"]}\n") and line.startswith(_SPACED_LIST, start):
        lb, rb = start + len(PREFIX) + 1, len(line) - 3
    else:
        lb, rb = list_brackets(line, start)
    if rb - lb < 2 or (line[lb + 1] in _WS and not line[lb + 1 : rb].strip(_WS)):
        return None
    return memoryview(line)[lb + 1 : rb]


def read_lists(texts: list, counts: list[int]) -> np.ndarray | None:
    """The values of several list texts (`list_text`) back to back, read by numpy in one call,
    when each text is exactly the JSON of its `counts[i]` values, compact or with one space
    after each comma (as ``json.dumps`` writes) -- then they are what JSON reads, and each
    line has the count its meta says; None otherwise (look at the lines one by one). Needs a
    numpy that refuses junk.

    Spaced texts are read as they are (numpy skips a field's leading spaces): when every
    space follows a comma, the text reads as its compact form (the spaces removed), so the
    compact test applies with the lengths less the spaces -- no copy. A pack of ``json.dumps``
    lines is told by one count (`_is_dumps_spaced`) instead of a look at every space."""
    if not REFUSES_JUNK:
        return None
    text = b",".join(texts)
    lengths = [len(t) for t in texts]
    spaces = 0
    if text.find(b" ") == -1:
        pass  # compact
    elif _is_dumps_spaced(text, texts, counts):
        spaces = sum(counts) - len(texts)
        lengths = [n - c + 1 for n, c in zip(lengths, counts)]
    else:  # spaced some other way (a pack of both styles): count each text's spaces
        b = np.frombuffer(text, dtype=np.uint8)
        sp = b == 32
        if sp[0] or (sp[1:] & (b[:-1] != 44)).any():
            return None  # a space not right after a comma (or two after one)
        per, a = [], 0
        for n in lengths:
            per.append(int(_nonzero(sp[a : a + n])))
            a += n + 1
        lengths = [n - k for n, k in zip(lengths, per)]
        spaces = sum(per)
    try:
        arr = _fromstring(text)
    except (ValueError, DeprecationWarning):
        return None
    return arr if _is_compact_json(arr, text, lengths, counts, spaces) else None


def _is_dumps_spaced(text: bytes, texts: list, counts: list[int]) -> bool:
    """Whether to test `text` as ``json.dumps`` lines: one space after each comma inside a text
    (none at a text's start), so text i is compact JSON plus counts[i] - 1 spaces.

    Only a hypothesis, confirmed by `_is_compact_json` with those lengths: there are exactly
    sum(counts) - len(texts) ``", "`` pairs here (counted on two uint16 views: ~1.5 ns/token,
    against ~9 for a look at every space), and numpy's reading R of the text without its S
    spaces is at least as long as its compact JSON. The per-text lengths passing means
    len(R) = that JSON's length + pairs - S, so S <= pairs: every space follows a comma (S = pairs)
    and R is that exact JSON. With no text starting with a space, text i then has at most
    (its fields - 1) spaces, in all exactly sum(counts) - len(texts): each has fields - 1, and
    the lengths, growing with every field, give it counts[i] fields."""
    if any(t[0] == 32 for t in texts):
        return False
    m = len(text)
    even = np.frombuffer(text, dtype=np.uint16, count=m // 2)
    odd = np.frombuffer(text, dtype=np.uint16, offset=1, count=(m - 1) // 2)
    return int(_nonzero(even == _COMMA_SPACE)) + int(_nonzero(odd == _COMMA_SPACE)) == sum(counts) - len(texts)


_COMMA_SPACE = int(np.frombuffer(b", ", dtype=np.uint16)[0])  # in this machine's byte order


def _is_compact_json(arr: np.ndarray, text: bytes, lengths: list[int], counts: list[int], spaces: int = 0) -> bool:
    """True when `text` -- texts of `lengths` bytes joined by commas, which numpy (refusing
    junk) read as `arr` -- is exactly the compact JSON of arr, with the i-th text holding the
    next `counts[i]` values, and every value is in range. `spaces`: how many spaces, each
    right after a comma, `text` has beyond that (`lengths` do not count them).

    Why: numpy read all of `text` as fields split by commas, each field a number from its
    digits with at most a sign and spaces around; a field with no digit reads as 0, and a
    trailing comma is taken. (a) With no value 0, every field has a digit; else, every
    character but digits being below "0" in ASCII, there is none but one comma between
    values and a minus per negative value. (b) Each text then holds whole fields, each at
    least as long as the compact JSON of its value; if, split by the counts, each text is
    exactly as long as the compact JSON of its values, there are no leading zeros, signs,
    spaces or trailing commas, and (the length growing with every value) each text holds
    exactly its count.
    """
    n = len(arr)
    if n != sum(counts) or not n:
        return False
    lo, hi = int(_min(arr)), int(_max(arr))
    if lo < -INT32_LIMIT or hi > INT32_LIMIT:
        return False
    # (a), with a value 0. A field of spaces alone reads 0 too (``[1, ,00]``: 1, 0, 0), so spaced
    # text with a 0 is looked at field by field (rare: token 0 is seldom in data).
    if lo <= 0 <= hi and _nonzero(arr) < n:
        if spaces:
            if not is_json_int_list(text, n):
                return False
        elif _nonzero(np.frombuffer(text, dtype=np.uint8) < 48) != n - 1 + _nonzero(arr < 0):
            return False
    # (b) a value's JSON: 1 digit, 1 more per power of ten it reaches, a minus when negative;
    # and a comma after each value but a text's last.
    big = max(hi, -lo)
    if big < _WIDTHS_LIMIT:
        w = _json_widths(big.bit_length()).take(arr)
    else:
        a = np.abs(arr)
        w = (arr < 0).view(np.int8)
        p = 10
        while p <= big:
            np.add(w, a >= p, out=w)
            p *= 10
    per = np.add.reduceat(w, [0, *itertools.accumulate(counts[:-1])], dtype=np.int64).tolist()
    return all(x + 2 * c - 1 == nb for x, c, nb in zip(per, counts, lengths))


_WIDTHS_LIMIT = 1 << 21


@functools.cache
def _json_widths(bits: int) -> np.ndarray:
    """A lookup table, int8, indexed by a value v with |v| < S = 2**max(bits, 16) (negative v
    from the end, as ``take`` does): the length of v's JSON minus 1."""
    s = 1 << max(bits, 16)
    extra = np.zeros(s + 1, dtype=np.int8)  # digits beyond the first of 0..s
    p = 10
    while p <= s:
        extra[p:] += 1
        p *= 10
    t = np.empty(2 * s, dtype=np.int8)
    t[:s] = extra[:s]
    t[s:] = extra[1:][::-1] + 1  # t[2s - j] = width of -j: its digits and the minus
    return t


_max, _min, _nonzero = np.maximum.reduce, np.minimum.reduce, np.count_nonzero


# --------------------------------------------------------------------------- checks


def is_canonical(arr: np.ndarray, nbytes: int, parts: int = 1) -> bool:
    """True when `arr` (numpy's reading of `parts` non-empty list texts of `nbytes` bytes in
    all, concatenated) has only nonzero in-range values and the texts are exactly their
    compact JSON: then every value is what JSON reads. False: look closer (`is_json_int_list`).

    Why a length suffices: numpy reads a number from its digits with at most a sign and spaces
    around, and a field with no digit as 0; it takes ``+5``, ``01``, ``- 5``, trailing commas
    and (old numpy) stops quietly at junk. With no value 0, each value came from a field with
    at least its own digits and a sign when negative, and fields from at least one comma
    between them -- so the text is at least as long as the compact JSON of the values, and
    exactly as long only when it is that JSON. Vectorised over a whole pack's documents.
    """
    a = np.abs(arr)
    hi = _max(a)
    if _min(a) <= 0 or hi > INT32_LIMIT:  # a 0, or abs() overflowed, or out of range
        return False
    n = len(a)
    digits, p = n, 10
    while p <= hi:
        digits += int(_nonzero(a >= p))
        p *= 10
    return nbytes == digits + _nonzero(arr < 0) + n - parts


_JSON_INT_CHARS = b"0123456789-, \t\r\n"


def is_json_int_list(body: bytes, n: int) -> bool:
    """Whether numpy's n values for `body` are exactly what JSON reads: numpy's parser also
    reads an empty or sign-only field ("[1, ]", "[1, ,2]", "[-]") as 0, and takes "+5",
    "01", "- 5". Vectorised: ~15 us for a 2048-token line."""
    if body.translate(None, _JSON_INT_CHARS):
        return False
    b = np.frombuffer(body, dtype=np.uint8)
    digit = (b - 48) <= 9  # uint8 wraps below "0"
    first = digit[1:] > digit[:-1]  # the first digit of each number but one at byte 0
    if np.count_nonzero(first) + digit[0] != n:
        return False
    minus = b == 45
    if np.count_nonzero(minus[:-1] & digit[1:]) != np.count_nonzero(minus):
        return False
    zero = b == 48  # no leading zeros
    return not (zero[0] and digit[1:2].any()) and not (first[:-1] & zero[1:-1] & digit[2:]).any()
