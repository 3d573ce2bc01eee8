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

from tokentrain.data import format as fmt
from tokentrain.data.index import FILE, LINE, NBYTES, OFFSET, DocIndex
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
                raise DataError(f"{path}: size is {size} bytes, was {self.index.file_sizes[fid]} when indexed; {_STALE}")
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
        row = self.index.docs[doc]
        fid, line, off, nbytes = int(row[FILE]), int(row[LINE]), int(row[OFFSET]), int(row[NBYTES])
        lead = 1 if off else 0
        buf = os.pread(self._fd(fid), nbytes + lead, off - lead)
        path = self.index.files[fid]
        if len(buf) != nbytes + lead or (lead and buf[0] != 0x0A):
            raise DataError(f"{path}: line {line + 1} (byte {off}) is not where the meta says; {_STALE}")
        body = buf[lead:]
        if b"\n" in body.rstrip():  # trailing blank lines before the next row are fine
            raise DataError(f"{path}: line {line + 1} (byte {off}) ends before the meta says; {_STALE}")
        if off + nbytes < self.index.file_sizes[fid] and not body.endswith(b"\n"):
            raise DataError(f"{path}: line {line + 1} (byte {off}) runs on past where the meta says it ends; {_STALE}")
        expected = int(self.index.ends[doc]) - self.index.doc_start(doc)
        tokens = fmt.parse_line(body, path, line + 1, off, expected)
        self._last = (doc, tokens)
        return tokens

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
