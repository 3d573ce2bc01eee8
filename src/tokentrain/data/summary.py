"""One summary per data file -- its problems, largest id, documents without a target, longest
document -- made by one full read, then kept in the cache, so a corpus is read once.

Why: checking data against a model (`data check --model`, and `train` at start) needs only
these few numbers per file. Reading every line runs at a few hundred MB/s per core, hours
per terabyte; a summary is a stat and a small JSON read. A summary is stored under the
file's real path with its identity (device, inode, size, mtime, *ctime*; see digest.py: a
write to the file always changes its ctime) and its meta's, so it is never used for
another version of either.

The read is split into byte ranges of whole lines (`ranges`), each summarised alone
(`scan_range`, in worker processes) and joined in order (`join`). A range is read with
numpy's parser in one call (`fastjson.read_lists`: exact, or it says it is unsure); a range
it is unsure of is read line by line, strictly, naming every bad line as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tokentrain.data import fastjson
from tokentrain.data import format as fmt
from tokentrain.errors import DataError

log = logging.getLogger(__name__)

SUMMARY_VERSION = 1
_PREFIX = np.frombuffer(fastjson.PREFIX, dtype=np.uint8)
_NL, _SPACE, _LB, _RB, _RC = 0x0A, 0x20, ord("["), ord("]"), ord("}")


@dataclass
class Summary:
    """What one file (or one range of it) holds. `problems`: (line, byte, what, on_meta) with
    line/byte None when the problem is the whole file's; line numbers count every line.
    `max_at`: (line, byte) of the first line holding `max_id`."""

    documents: int = 0
    empty_documents: int = 0
    tokens: int = 0
    longest: int = 0
    max_id: int = -1  # the largest abs(token): the input id the model sees
    max_at: list | None = None
    min_token: int | None = None
    no_target: int = 0  # documents where no token after the first is > 0
    no_target_zero: int = 0  # ... is >= 0 (zero_is_target)
    newlines: int = 0
    problems: list = field(default_factory=list)

    def add(self, other: Summary, line_base: int) -> None:
        """Append the summary of the next range, whose lines start after `line_base` lines."""
        if other.max_id > self.max_id and other.max_at is not None:
            self.max_id, self.max_at = other.max_id, [other.max_at[0] + line_base, other.max_at[1]]
        if other.min_token is not None:
            self.min_token = other.min_token if self.min_token is None else min(self.min_token, other.min_token)
        for k in ("documents", "empty_documents", "tokens", "no_target", "no_target_zero", "newlines"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.longest = max(self.longest, other.longest)
        self.problems += [[None if ln is None else ln + line_base, *rest] for ln, *rest in other.problems]


# --------------------------------------------------------------------------- reading a range


@dataclass(frozen=True)
class Range:
    """Bytes [lo, hi) of a file, holding its meta rows [r0, r1) (`meta` None: no usable meta,
    then the range is the whole file, read line by line)."""

    path: str
    lo: int
    hi: int
    meta: str | None = None
    r0: int = 0
    r1: int = 0


def ranges(path: Path, meta_path: Path | None, meta: np.ndarray | None, size: int, chunk: int) -> list[Range]:
    """The file cut into ranges of about `chunk` bytes at line starts (from its meta)."""
    if meta is None:
        return [Range(str(path), 0, size)]
    if not len(meta):
        return []
    offsets = meta[:, 0]
    cuts = [0]
    while True:  # the first row starting at or after the next `chunk` bytes
        r = int(np.searchsorted(offsets, offsets[cuts[-1]] + chunk))
        if r >= len(offsets):
            break
        cuts.append(r)
    bounds = [0, *(int(offsets[r]) for r in cuts[1:]), size]  # blank lines before the first row: in range 0
    rows = [*cuts, len(offsets)]
    return [Range(str(path), bounds[i], bounds[i + 1], str(meta_path), rows[i], rows[i + 1]) for i in range(len(cuts))]


def scan_range(r: Range) -> Summary:
    """The summary of one range: fast when numpy reads it all exactly, else line by line."""
    lead = 1 if r.lo else 0  # the byte before the range: a line start must follow a newline
    with open(r.path, "rb") as f:
        buf = os.pread(f.fileno(), r.hi - r.lo + lead, r.lo - lead)
        size = os.fstat(f.fileno()).st_size
    if r.meta is None:
        return _scan_lines(r, buf)
    meta = np.asarray(np.load(r.meta, mmap_mode="r")[r.r0 : r.r1, :2], dtype=np.int64)
    return _scan_fast(r, buf, lead, meta, size) or _scan_rows(r, buf, lead, meta, size)


def _scan_fast(r: Range, buf: bytes, lead: int, meta: np.ndarray, size: int) -> Summary | None:
    """One numpy read of every list in the range when each row is one usual line
    (``{"tokens": [..]}`` + newline -- the file's last may lack it -- exactly where the meta
    says); None when unsure."""
    arr = np.frombuffer(buf, dtype=np.uint8)
    offs = meta[:, 0] - r.lo + lead
    ends = np.append(offs[1:], len(buf))
    last_nl = bool(arr[-1] == _NL)
    if not last_nl and r.hi < size:
        return None  # a line running on into the next range
    want = ends[:-1] - 1 if not last_nl else ends - 1
    if lead:
        want = np.concatenate(([0], want))
    newlines = np.flatnonzero(arr == _NL)
    if not np.array_equal(newlines, want) or ((ends - offs) < len(fastjson.PREFIX) + 3).any():
        return None  # blank lines, a misplaced row, or a line too short to be usual
    if not (arr[offs[:, None] + np.arange(len(_PREFIX))] == _PREFIX).all():
        return None
    lb = offs + len(_PREFIX)
    lb += arr[lb] == _SPACE
    stop = ends - 1
    stop[-1] = ends[-1] - (1 if last_nl else 0)
    rb = stop - 2
    if not ((arr[lb] == _LB).all() and (arr[rb] == _RB).all() and (arr[rb + 1] == _RC).all()):
        return None
    counts = meta[:, 1]
    empty = counts == 0
    if (empty != (rb == lb + 1)).any():
        return None
    view = memoryview(buf)
    full = ~empty
    texts = [view[a:b] for a, b in zip((lb[full] + 1).tolist(), rb[full].tolist())]
    flat = fastjson.read_lists(texts, counts[full].tolist()) if texts else np.zeros(0, np.int64)
    if flat is None:
        return None
    s = _stats(flat, counts, meta[:, 0], np.arange(1, len(counts) + 1))
    s.newlines = len(newlines) - lead
    return s


def _stats(flat: np.ndarray, counts: np.ndarray, offsets: np.ndarray, lines: np.ndarray) -> Summary:
    """The numbers of documents read back to back into `flat` (`counts` tokens each)."""
    s = Summary(documents=len(counts), tokens=len(flat))
    s.empty_documents = int((counts == 0).sum())
    s.longest = int(counts.max(initial=0))
    if not len(flat):
        s.no_target = s.no_target_zero = len(counts)
        return s
    ids = np.abs(flat)
    top = int(np.argmax(ids))
    doc = int(np.searchsorted(np.cumsum(counts), top, side="right"))
    s.max_id, s.max_at = int(ids[top]), [int(lines[doc]), int(offsets[doc])]
    s.min_token = int(flat.min())
    full = counts > 0
    starts = np.cumsum(counts)[full] - counts[full]  # where each non-empty document starts in flat
    ends = np.append(starts[1:], len(flat))
    for name, target in (("no_target", flat > 0), ("no_target_zero", flat >= 0)):
        where = np.flatnonzero(target)
        # a target after a document's first token (which is never one) and before its end
        has = np.searchsorted(where, ends) > np.searchsorted(where, starts + 1)
        setattr(s, name, len(counts) - int(has.sum()))
    return s


class _Docs:
    """Documents read one by one (the strict path), gathered for `_stats`."""

    def __init__(self):
        self.toks: list[np.ndarray] = []
        self.rows: list[tuple[int, int, int]] = []  # count, byte, line

    def add(self, toks: np.ndarray, byte: int, line: int) -> None:
        self.toks.append(toks)
        self.rows.append((len(toks), byte, line))

    def summary(self, problems: list, newlines: int) -> Summary:
        if self.rows:
            counts, offsets, lines = (np.asarray(c, dtype=np.int64) for c in zip(*self.rows))
            s = _stats(np.concatenate(self.toks), counts, offsets, lines)
        else:
            s = Summary()
        s.problems, s.newlines = problems, newlines
        return s


def _scan_rows(r: Range, buf: bytes, lead: int, meta: np.ndarray, size: int) -> Summary:
    """Each meta row checked alone: where it is, then its line strictly (every problem named)."""
    arr = np.frombuffer(buf, dtype=np.uint8)
    newlines = np.flatnonzero(arr[lead:] == _NL)  # positions from r.lo
    offs = meta[:, 0].tolist()
    ends = [*offs[1:], r.hi]
    docs, problems = _Docs(), list[list]()
    for off, end, count in zip(offs, ends, meta[:, 1].tolist()):
        lineno = int(np.searchsorted(newlines, off - r.lo)) + 1
        line = buf[off - r.lo + lead : end - r.lo + lead]
        prev = buf[off - r.lo + lead - 1] if off else _NL
        why = misplaced(prev, line, off + len(line) < size)
        if why:
            problems.append([lineno, off, f"{why}; rebuild the meta", False])
            continue
        _read_line(docs, problems, r.path, line, lineno, off, count)
    return docs.summary(problems, len(newlines))


def _scan_lines(r: Range, buf: bytes) -> Summary:
    """A file with no usable meta: every non-blank line checked alone."""
    arr = np.frombuffer(buf, dtype=np.uint8)
    newlines = np.flatnonzero(arr == _NL)
    starts = np.concatenate(([0], newlines + 1)).tolist()
    ends = np.concatenate((newlines + 1, [len(buf)])).tolist()
    docs, problems = _Docs(), list[list]()
    for lineno, (s, end) in enumerate(zip(starts, ends), 1):
        line = buf[s:end]
        if line.strip():
            _read_line(docs, problems, r.path, line, lineno, s, None)
    return docs.summary(problems, len(newlines))


def misplaced(prev: int, line: bytes, more_after: bool) -> str | None:
    """Why the meta's line (after byte `prev`) is not one line of the file, or None."""
    if prev != _NL:
        return "the meta's offset is not at a line start"
    if b"\n" in line.rstrip():
        return "the meta skips a line here"
    if more_after and not line.endswith(b"\n"):
        return "the line runs on past where the meta says it ends"
    return None


def _read_line(docs: _Docs, problems: list, path, line: bytes, lineno: int, off: int, count: int | None) -> None:
    try:
        docs.add(fmt.parse_line(line, path, lineno, off, count), off, lineno)
    except DataError as e:
        problems.append([lineno, off, str(e).split("): ", 1)[-1], False])


# --------------------------------------------------------------------------- indexing


def index_file(path: Path, chunk: int = 16 << 20) -> tuple[np.ndarray, Summary | None]:
    """A data file's meta and its summary, from one read when every line is usual (the
    counts guessed from the commas, then confirmed exactly by `_scan_fast`); else the meta
    line by line (`format.build_meta`, which names a bad line) and no summary."""
    data = path.read_bytes()
    arr = np.frombuffer(data, dtype=np.uint8)
    starts = np.concatenate(([0], np.flatnonzero(arr == _NL) + 1))
    if len(starts) > 1 and starts[-1] == len(data):
        starts = starts[:-1]  # the final newline ends the last line
    if not len(data) or (arr[starts] != ord("{")).any():  # blank lines: the careful way
        return fmt.build_meta(path), None
    ends = np.append(starts[1:], len(data))
    stop = ends - (arr[ends - 1] == _NL)
    commas = np.diff(np.searchsorted(np.flatnonzero(arr == ord(",")), np.append(starts, len(data))))
    empty = (commas == 0) & (stop - starts >= 3) & (arr[np.maximum(stop - 3, 0)] == _LB)
    meta = np.stack((starts, np.where(empty, 0, commas + 1)), axis=1).astype(np.int64)
    out = Summary()
    for r in ranges(path, fmt.meta_path(path), meta, len(data), chunk):
        lead = 1 if r.lo else 0
        part = _scan_fast(r, data[r.lo - lead : r.hi], lead, meta[r.r0 : r.r1], len(data))
        if part is None:
            return fmt.build_meta(path), None
        out.add(part, line_base=out.newlines)
    return meta, out


# --------------------------------------------------------------------------- the cache


def _identity(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _entry(path: Path) -> Path:
    from tokentrain.data.cache import cache_root

    real = os.path.realpath(path)
    return cache_root() / "summary" / f"{hashlib.sha1(real.encode()).hexdigest()[:20]}.json"


def file_key(path: Path, meta_path: Path | None) -> list:
    """What a summary depends on: the file's identity and its meta's (None: no meta)."""
    return [SUMMARY_VERSION, _identity(path), _identity(meta_path) if meta_path is not None else None]


def load(path: Path, key: list) -> Summary | None:
    """The stored summary of this version of the file, or None."""
    try:
        rec = json.loads(_entry(path).read_text())
        if rec.get("key") != key:
            return None
        return Summary(**rec["summary"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def store(path: Path, key: list, summary: Summary) -> None:
    """Keep the summary (best effort: an unwritable cache only costs a later re-read)."""
    from tokentrain.utils.atomic import atomic_file

    entry = _entry(path)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(entry, "w") as f:
            json.dump({"path": os.path.realpath(path), "key": key, "summary": asdict(summary)}, f)
    except OSError as e:
        log.debug("%s: summary not cached (%s)", path, e)


def remember(path: Path, meta_path: Path, summary: Summary | None) -> None:
    """Store the summary made while indexing, once its meta is saved beside the file."""
    if summary is not None and meta_path == fmt.meta_path(path):
        store(path, file_key(path, meta_path), summary)


def usable_meta(path: Path) -> Path | None:
    """The meta a file's lines are checked against: beside it (as `data check` always did)."""
    mp = fmt.meta_path(path)
    return mp if mp.exists() else None


def stored_max_id(path: Path) -> tuple[int, list | None] | None:
    """(largest id, (line, byte) of it) of the file as last summarised, or None when this
    version of the file (and its meta) has no summary: what `train` reads at start."""
    try:
        found = load(path, file_key(path, usable_meta(path)))
    except OSError:
        return None
    return None if found is None else (found.max_id, found.max_at)
