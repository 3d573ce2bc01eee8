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

    def __len__(self) -> int:
        raise NotImplementedError  # each kind of dataset counts its samples

    def _docs_of(self, k: int) -> range:
        """The documents sample k draws from."""
        raise NotImplementedError

    def _assemble(self, k: int, frags: list[tuple[int, int, int]]) -> dict:
        """Build a sample from (doc, a, b) fragments: tokens [a, b) of document doc. The
        fragments are consecutive documents, each but the first from its start and each but
        the last to its end (as packs and unpacked samples are)."""
        lo, n = frags[0][0], len(frags)
        cut = frags[-1][2] - (int(self.index.ends[lo + n - 1]) - self.index.doc_start(lo + n - 1))
        assert frags[-1][0] == lo + n - 1 and all(a == 0 for _, a, _ in frags[1:]) and cut <= 0, (
            "fragments must be contiguous"
        )
        return self._sample(
            k, lo, lo + n, frags[0][1], int(self.index.ends[lo + n - 1]) - self.index.doc_start(lo) + cut
        )

    def _sample(self, k: int, lo: int, hi: int, start: int, stop: int) -> dict:
        """The sample of tokens [start, stop) of documents lo..hi-1 read back to back."""
        flat, starts = self.reader.read_span(lo, hi)
        n = stop - start
        ids = np.abs(flat[start:stop])
        labels = np.empty(n, dtype=np.int64)
        m = min(n, len(flat) - start - 1)
        labels[:m] = flat[start + 1 : start + 1 + m]  # the next token; the last one only if in flat
        np.putmask(labels, labels < 0 if self.zero_is_target else labels <= 0, IGNORE_INDEX)
        # Documents' fragments: where each ends in the sample; a document that ends inside
        # the sample has no target at its last token, one cut at the edge keeps its own next.
        cu, pos = [0], []
        positions = _positions(self.max_length)
        for e in starts[1:]:
            f = (e if e < stop else stop) - start
            pos.append(positions[: f - cu[-1]])
            cu.append(f)
            if e <= stop:
                labels[f - 1] = IGNORE_INDEX
        return {
            "input_ids": ids,
            "labels": labels,
            "position_ids": np.concatenate(pos) if len(pos) > 1 else pos[0].copy(),
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
        ends = np.asarray(self.index.ends)  # a plain view of the memory map: cheaper to index
        lo, hi = int(ends.searchsorted(s, "right")), int(ends.searchsorted(e, "left")) + 1
        first = int(ends[lo - 1]) if lo else 0  # where document lo starts in the stream
        return self._sample(k, lo, hi, s - first, e - first)


class UnpackedDataset(_DocDataset):
    """One document per sample, truncated to max_length."""

    def __init__(self, index: DocIndex, max_length: int, zero_is_target: bool = False):
        super().__init__(index, max_length, zero_is_target)
        truncated = int((index.lengths() > self.max_length).sum())
        if truncated:
            log.info(
                "%d of %d documents are longer than max_length=%d and will be truncated",
                truncated,
                len(index),
                max_length,
            )

    def __len__(self) -> int:
        return len(self.index)

    def _docs_of(self, k: int) -> range:
        k = self._check(k)
        return range(k, k + 1)

    def __getitem__(self, k: int) -> dict:
        k = self._check(k)
        n = int(self.index.ends[k]) - self.index.doc_start(k)
        return self._assemble(k, [(k, 0, min(n, self.max_length))])
