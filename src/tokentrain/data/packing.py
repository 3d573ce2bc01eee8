"""Samples as training sees them: packed (cut mode) or one document per sample.

Cut mode (``pack_to_max_length=True``): the documents, in the table's order, are one
stream of tokens cut every ``max_length``. Pack k is the token range
``[k*L, (k+1)*L)``; the documents it touches are found with two binary searches on
the cumulative ends, so the cost of a pack does not grow with the size of the corpus
or of any file. A document cut at a pack edge continues in the next pack, and its last
token in the earlier pack keeps its real target (the next token of the same document).
``position_ids`` restart at 0 at every document fragment and ``cu_seqlens`` marks the
fragments. The final incomplete pack is dropped by default (logged).

Unpacked (``pack_to_max_length=False``): sample i is document i truncated to
``max_length`` (count logged); like a pack edge, the truncated end keeps its real target.

A sample is a dict of numpy arrays: ``input_ids``, ``labels``, ``position_ids`` (int64,
length <= L), ``cu_seqlens`` (int32, fragment boundaries from 0 to the length) and
``index`` (the sample number, to name its sources in errors).
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from tokentrain.data.format import IGNORE_INDEX
from tokentrain.data.index import DocIndex
from tokentrain.data.reader import DocReader

log = logging.getLogger(__name__)

_NO_TARGET = np.array([IGNORE_INDEX], dtype=np.int64)


@functools.lru_cache(maxsize=8)
def _positions(n: int) -> np.ndarray:
    """0..n-1, shared: position_ids are slices of it, copied."""
    a = np.arange(n, dtype=np.int64)
    a.flags.writeable = False
    return a


class _DocDataset:
    def __init__(self, index: DocIndex, max_length: int, zero_is_target: bool = False):
        if max_length <= 0:
            raise ValueError("max_length must be positive")
        self.index = index
        self.max_length = int(max_length)
        self.zero_is_target = zero_is_target
        self.reader = DocReader(index)

    def _assemble(self, k: int, frags: list[tuple[int, int, int]]) -> dict:
        """Build a sample from (doc, a, b) fragments: tokens [a, b) of document doc."""
        lo, n = frags[0][0], len(frags)
        if frags[-1][0] - lo == n - 1:  # consecutive documents (always, for packs): one read
            raws = self.reader.read_many(lo, lo + n)
        else:
            raws = [self.reader.read(d) for d, _, _ in frags]
        # Each output is one new array filled in place: fewer large allocations, which cost
        # page faults when the allocator hands freed memory back between samples.
        pieces, nxt, pos, cu = [], [], [], [0]
        positions = _positions(self.max_length)
        for r, (_, a, b) in zip(raws, frags):
            pieces.append(r[a:b])
            # The target of a fragment's last token is the document's own next token (beyond
            # the sample edge), or nothing at the document's end.
            nxt.append(r[a + 1 : b + 1])
            if b >= len(r):
                nxt.append(_NO_TARGET)
            pos.append(positions[: b - a])
            cu.append(cu[-1] + b - a)
        ids = np.concatenate(pieces)
        np.abs(ids, out=ids)
        labels = np.concatenate(nxt)
        np.putmask(labels, labels < 0 if self.zero_is_target else labels <= 0, IGNORE_INDEX)
        return {
            "input_ids": ids,
            "labels": labels,
            "position_ids": np.concatenate(pos),
            "cu_seqlens": np.array(cu, dtype=np.int32),
            "index": k,
        }

    def sources(self, k: int) -> list[tuple[str, int]]:
        """(file, 1-based line) of every document sample k draws from."""
        return [self.reader.where(d)[:2] for d in self._docs_of(k)]

    def _check(self, k: int) -> int:
        n = len(self)
        if not -n <= k < n:
            raise IndexError(f"sample {k} out of range ({n} samples)")
        return k % n


class PackedDataset(_DocDataset):
    """Cut mode: fixed-length packs of the document stream."""

    def __init__(self, index: DocIndex, max_length: int, zero_is_target: bool = False, drop_last: bool = True):
        super().__init__(index, max_length, zero_is_target)
        total = index.num_tokens
        full, rest = divmod(total, self.max_length)
        self.num_packs = full if (drop_last or not rest) else full + 1
        if drop_last and rest:
            log.info("dropped the final incomplete pack (%d of %d tokens)", rest, total)
        if self.num_packs == 0:
            from tokentrain.errors import DataError

            raise DataError(f"the dataset has {total} tokens, fewer than one pack of max_length={max_length}")

    def __len__(self) -> int:
        return self.num_packs

    def _span(self, k: int) -> tuple[int, int]:
        s = k * self.max_length
        return s, min(s + self.max_length, self.index.num_tokens)

    def _docs_of(self, k: int) -> range:
        s, e = self._span(self._check(k))
        ends = self.index.ends
        return range(int(np.searchsorted(ends, s, side="right")), int(np.searchsorted(ends, e, side="left")) + 1)

    def __getitem__(self, k: int) -> dict:
        k = self._check(k)
        s, e = self._span(k)
        ends = self.index.ends
        lo, hi = int(ends.searchsorted(s, "right")), int(ends.searchsorted(e, "left")) + 1
        bounds = ends[lo - 1 : hi].tolist() if lo else [0, *ends[:hi].tolist()]  # doc starts and ends
        frags = [(lo + j, max(s, bounds[j]) - bounds[j], min(e, bounds[j + 1]) - bounds[j]) for j in range(hi - lo)]
        return self._assemble(k, frags)


class UnpackedDataset(_DocDataset):
    """One document per sample, truncated to max_length."""

    def __init__(self, index: DocIndex, max_length: int, zero_is_target: bool = False):
        super().__init__(index, max_length, zero_is_target)
        truncated = int((index.lengths() > self.max_length).sum())
        if truncated:
            log.info("%d of %d documents are longer than max_length=%d and will be truncated", truncated, len(index), max_length)

    def __len__(self) -> int:
        return len(self.index)

    def _docs_of(self, k: int) -> range:
        k = self._check(k)
        return range(k, k + 1)

    def __getitem__(self, k: int) -> dict:
        k = self._check(k)
        n = int(self.index.ends[k]) - self.index.doc_start(k)
        return self._assemble(k, [(k, 0, min(n, self.max_length))])
