"""Full scans of a dataset: statistics and validation of every line against its meta."""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tokentrain.data import format as fmt
from tokentrain.data.index import ensure_meta
from tokentrain.data.summary import misplaced
from tokentrain.errors import DataError


@dataclass
class Problem:
    file: str
    line: int | None
    byte: int | None
    what: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f": line {self.line}"
        if self.byte is not None:
            where += f" (byte {self.byte})"
        return f"{where}: {self.what}"


def _map(path: Path):
    """The file's bytes without reading them all into memory (empty files can't be mmapped)."""
    size = path.stat().st_size
    if size == 0:
        return b""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _line_spans(meta: np.ndarray, size: int):
    offsets = meta[:, 0]
    return zip(offsets.tolist(), np.diff(offsets, append=size).tolist(), meta[:, 1].tolist())


# --------------------------------------------------------------------------- check


TICK = 4096  # lines between progress updates inside a file


class _Ticks:
    """Feeds a Progress from inside a file's line loop: bytes and lines every TICK lines."""

    def __init__(self, progress):
        self.progress, self.bytes, self.lines = progress, 0, 0

    def line(self, nbytes: int) -> None:
        if self.progress is None:
            return
        self.bytes += nbytes
        self.lines += 1
        if self.lines >= TICK:
            self.flush()

    def flush(self) -> None:
        if self.progress is not None and (self.bytes or self.lines):
            self.progress.update(self.bytes, self.lines)
        self.bytes, self.lines = 0, 0


# --------------------------------------------------------------------------- stats


@dataclass
class Stats:
    files: int = 0
    empty_files: int = 0
    documents: int = 0
    tokens: int = 0
    target_tokens: int = 0
    zero_tokens: int = 0
    lengths: list = field(default_factory=list)

    def as_dict(self) -> dict:
        lens = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        pct = {}
        if len(lens):
            for q in (0, 1, 10, 50, 90, 99, 100):
                pct[f"p{q}"] = int(np.percentile(lens, q, method="nearest"))
        return {
            "files": self.files,
            "empty_files": self.empty_files,
            "documents": self.documents,
            "empty_documents": int((lens == 0).sum()),
            "tokens": self.tokens,
            "target_tokens": self.target_tokens,
            "id0_tokens": self.zero_tokens,
            "mean_length": float(lens.mean()) if len(lens) else 0.0,
            "length_percentiles": pct,
        }


def dataset_stats(files: list[Path], progress=None) -> Stats:
    """Counts over every token: needs a full read (the meta alone has no signs)."""
    st = Stats(files=len(files))
    for p in files:
        ticks = _Ticks(progress)
        try:
            _file_stats(p, st, ticks)
        finally:
            ticks.flush()
    return st


def _file_stats(p: Path, st: Stats, ticks: _Ticks) -> None:
    try:
        size = p.stat().st_size
    except OSError as e:  # e.g. a dangling symlink
        raise DataError(f"{p}: cannot read data file ({e.strerror})") from None
    if size == 0:
        st.empty_files += 1
        return
    meta = fmt.read_meta(ensure_meta(p), p, size)
    data = _map(p)
    st.documents += len(meta)
    st.lengths.append(meta[:, 1].copy())
    for lineno, (off, nbytes, count) in enumerate(_line_spans(meta, size), 1):
        ticks.line(nbytes)
        line = data[off : off + nbytes]
        why = misplaced(data[off - 1] if off else 0x0A, line, off + nbytes < size)
        if why:
            raise DataError(
                f"{p}: line {lineno} (byte {off}): {why}; the meta is stale; rebuild it with `tokentrain "
                "data index --rebuild`"
            )
        toks = fmt.parse_line(line, p, lineno, off, count)
        st.tokens += len(toks)
        st.target_tokens += int((toks > 0).sum())
        st.zero_tokens += int((toks == 0).sum())
