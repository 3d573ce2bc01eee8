"""Reads single documents by their row in the document table, checking each line as it goes.

File descriptors are opened lazily per process (safe after a DataLoader fork) and read
with ``os.pread``, so nothing is shared or seeked. Each read takes the byte before the
line too, and checks that the line starts and ends where the meta says and has the
token count the meta says: a file rewritten under a running job is caught, never turned
into a silently wrong pack.
"""

from __future__ import annotations

import os

import numpy as np

from tokentrain.data import fastjson
from tokentrain.data import format as fmt
from tokentrain.data.index import FILE, LINE, OFFSET, DocIndex
from tokentrain.errors import DataError

_STALE = "the file changed after it was indexed; rebuild its meta with `tokentrain data index --rebuild` and restart"


class DocReader:
    def __init__(self, index: DocIndex):
        self.index = index
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        self._last: tuple[int, np.ndarray] | None = None  # a long document spans many packs

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fds"], state["_last"] = {}, None
        return state

    def _fd(self, fid: int) -> int:
        if self._pid != os.getpid():  # forked into a worker: the parent's fds are not ours
            self._fds, self._pid, self._last = {}, os.getpid(), None
        fd = self._fds.get(fid)
        if fd is None:
            path = self.index.files[fid]
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise DataError(f"{path}: cannot open data file ({e.strerror})") from None
            size = os.fstat(fd).st_size
            if size != self.index.file_sizes[fid]:
                os.close(fd)
                raise DataError(
                    f"{path}: size is {size} bytes, was {self.index.file_sizes[fid]} when indexed; {_STALE}"
                )
            self._fds[fid] = fd
        return fd

    def where(self, doc: int) -> tuple[str, int, int]:
        """(file, 1-based line number, byte offset) of a document: for error messages."""
        row = self.index.docs[doc]
        return self.index.files[int(row[FILE])], int(row[LINE]) + 1, int(row[OFFSET])

    def read(self, doc: int) -> np.ndarray:
        """The signed tokens of one document (row of the document table)."""
        if self._last is not None and self._last[0] == doc:
            return self._last[1]
        n = len(self.index)
        d = doc + n if doc < 0 else doc
        if not 0 <= d < n:
            raise IndexError(f"document {doc} out of range ({n} documents)")
        return self.read_many(d, d + 1)[0]

    def read_many(self, lo: int, hi: int) -> list[np.ndarray]:
        """``[self.read(d) for d in range(lo, hi)]``: same tokens, checks and first error."""
        flat, starts = self.read_span(lo, hi)
        return [flat[starts[i] : starts[i + 1]] for i in range(hi - lo)]

    def read_span(self, lo: int, hi: int) -> tuple[np.ndarray, list[int]]:
        """Documents lo..hi-1 back to back in one array, and where each starts in it (and the
        end): what `read_many` returns, for less. One slice of the table for all rows; the
        lines' lists read and checked together, vectorised (`fastjson.read_lists`). Only when
        that fails (a bad line, unusual spacing) is each line looked at alone. Do not write to
        the array."""
        if self._pid != os.getpid():  # forked into a worker: the parent's fds are not ours
            self._fds, self._pid, self._last = {}, os.getpid(), None
        if hi <= lo:
            return np.zeros(0, dtype=np.int64), [0]
        index, last, fds = self.index, self._last, self._fds
        ends = np.asarray(index.ends)  # plain views of the memory maps: cheaper to slice
        rows = np.asarray(index.docs)[lo:hi].tolist()
        cum = ends[lo - 1 : hi].tolist() if lo else [0, *ends[:hi].tolist()]
        starts = [c - cum[0] for c in cum]
        skip = 1 if last is not None and last[0] == lo else 0  # a long document spans packs
        bufs: list[bytes] = []
        texts: list | None = []  # each line's list text, while all lines look usual
        for fid, _line, off, nbytes in rows[skip:] if skip else rows:
            lead = 1 if off else 0
            try:
                fd = fds.get(fid)
                buf = os.pread(self._fd(fid) if fd is None else fd, nbytes + lead, off - lead)
            except DataError:
                texts = None  # raised again below, after the lines before it
                break
            bufs.append(buf)
            if texts is not None:
                # the usual line: in place, one newline at its end (the checks in _read_each pass)
                if buf.find(b"\n", lead) == nbytes + lead - 1 and (not lead or buf[0] == 0x0A):
                    text = fastjson.list_text(buf, lead)
                    if text is not None:
                        texts.append(text)
                        continue
                texts = None
        if texts:
            counts = [cum[i + 1] - cum[i] for i in range(skip, hi - lo)]
            flat = fastjson.read_lists(texts, counts)
            if flat is not None:
                if last is not None and skip:
                    flat = np.concatenate((last[1], flat))
                self._last = (hi - 1, flat[starts[-2] :])
                return flat, starts
        out = self._read_each(rows, cum, bufs, skip)
        flat = out[0] if len(out) == 1 else np.concatenate(out)
        self._last = (hi - 1, flat[starts[-2] :])
        return flat, starts

    def _read_each(self, rows: list, cum: list[int], bufs: list[bytes], skip: int) -> list[np.ndarray]:
        """Rows' tokens one line at a time (`bufs`: the lines already read, from row `skip`;
        row 0 is the cached last document when `skip`), raising the first line's error."""
        index, fds = self.index, self._fds
        out: list[np.ndarray] = [self._last[1]] if skip and self._last is not None else []
        todo: list[tuple] = []  # lines numpy read, not yet confirmed
        for i in range(skip, len(rows)):
            fid, line, off, nbytes = rows[i]
            expected = cum[i + 1] - cum[i]
            lead = 1 if off else 0
            try:
                if i - skip < len(bufs):
                    buf = bufs[i - skip]
                else:
                    fd = fds.get(fid)
                    buf = os.pread(self._fd(fid) if fd is None else fd, nbytes + lead, off - lead)
                if buf.find(b"\n", lead) == nbytes + lead - 1 and (not lead or buf[0] == 0x0A):
                    pass  # the usual line: in place, one newline at its end (all the checks below pass)
                elif len(buf) != nbytes + lead or (lead and buf[0] != 0x0A):
                    raise DataError(
                        f"{index.files[fid]}: line {line + 1} (byte {off}) is not where the meta says; {_STALE}"
                    )
                else:
                    nl = buf.find(b"\n", lead)
                    if nl != -1 and buf[nl:].strip():  # trailing blank lines before the next row are fine
                        raise DataError(
                            f"{index.files[fid]}: line {line + 1} (byte {off}) ends before the meta says; {_STALE}"
                        )
                    if off + nbytes < index.file_sizes[fid] and not buf.endswith(b"\n", lead):
                        raise DataError(
                            f"{index.files[fid]}: line {line + 1} (byte {off}) runs on past where the meta "
                            f"says it ends; {_STALE}"
                        )
            except DataError:
                self._confirm(out, todo)
                raise
            got = fastjson.read_list(buf, lead)
            if got is None or len(got[0]) != expected:
                self._confirm(out, todo)  # earlier lines' errors come first
                out.append(fmt.parse_line(buf[lead:], index.files[fid], line + 1, off, expected))
                continue
            out.append(got[0])
            if expected:
                todo.append((i, len(got[1]), buf, lead, fid, line, off, expected))
        self._confirm(out, todo)
        return out

    def _confirm(self, out: list[np.ndarray], todo: list[tuple], batch: bool = True) -> None:
        """Check numpy's readings `todo` of lines (entries of `out`): all at once, else one by
        one, re-reading a line the strict way when its text is not plainly its values."""
        if not todo:
            return
        arrs = [out[t[0]] for t in todo]
        if not batch or not fastjson.is_canonical(
            arrs[0] if len(arrs) == 1 else np.concatenate(arrs), sum(t[1] for t in todo), len(todo)
        ):
            for i, nb, buf, lead, fid, line, off, expected in todo:
                if not fastjson.is_canonical(out[i], nb):
                    out[i] = fmt.parse_line(buf[lead:], self.index.files[fid], line + 1, off, expected)
        todo.clear()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self):
        try:
            if self._pid == os.getpid():
                self.close()
        except Exception:
            pass
