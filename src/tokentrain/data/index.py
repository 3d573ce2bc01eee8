"""The document table of a dataset: every kept document, in training order, as numpy arrays.

Built once from the ``.meta`` files with vectorised numpy (concatenate, filter, permute,
cumsum), saved to a cache folder keyed by everything that determines it, and opened
memory-mapped: the 8 ranks of a node share the same pages, nothing is pickled or
broadcast, and a later run opens it in milliseconds. A file lock makes exactly one process
per node build it; the others wait and map the result.

Arrays (D = kept documents, in training order):
  ``docs``  (D, 4) int64: file id, line number (0-based meta row), byte offset, byte length
  ``ends``  (D,)   int64: cumulative token count at the end of each document
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tokentrain.data import format as fmt
from tokentrain.data.cache import cache_root
from tokentrain.data.summary import index_file, remember
from tokentrain.errors import DataError

log = logging.getLogger(__name__)

INDEX_VERSION = 1
FILE, LINE, OFFSET, NBYTES = range(4)


@dataclass
class IndexStats:
    files: int = 0
    empty_files: int = 0
    built_metas: int = 0
    documents: int = 0
    empty_documents: int = 0
    short_documents: int = 0
    tokens: int = 0


@dataclass
class DocIndex:
    files: list[str]
    file_sizes: list[int]
    docs: np.ndarray
    ends: np.ndarray
    stats: IndexStats = field(default_factory=IndexStats)
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.ends)

    @property
    def num_tokens(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def lengths(self) -> np.ndarray:
        return np.diff(self.ends, prepend=0)

    def doc_start(self, i: int) -> int:
        return int(self.ends[i - 1]) if i else 0


# --------------------------------------------------------------------------- metas


def ensure_meta(data_path: Path, stats: IndexStats | None = None) -> Path:
    """Path of the meta of one data file; a missing one is built beside it, or in the cache
    when the folder is read-only (logged either way)."""
    found = find_meta(data_path)
    if found is not None:
        return found
    mp, cached = fmt.meta_path(data_path), _cached_meta_path(data_path)
    meta, summary = index_file(data_path)
    if stats is not None:
        stats.built_metas += 1
    try:
        fmt.save_meta(meta, mp)
        log.info("%s: no meta; built %s (%d lines)", data_path, mp.name, len(meta))
        remember(data_path, mp, summary)  # its largest id, for the vocabulary check at start
        return mp
    except OSError:
        cached.parent.mkdir(parents=True, exist_ok=True)
        fmt.save_meta(meta, cached)
        log.info("%s: no meta and the folder is read-only; built it into %s", data_path, cached)
        return cached


def find_meta(data_path: Path) -> Path | None:
    """The meta of one data file, beside it or (a read-only folder) in the cache; None when
    it has none yet."""
    mp = fmt.meta_path(data_path)
    if mp.exists():
        return mp
    cached = _cached_meta_path(data_path)
    if cached.exists() and cached.stat().st_mtime_ns >= data_path.stat().st_mtime_ns:
        return cached
    return None


def _check_empty(data_path: Path) -> None:
    """A 0-byte data file is empty only if its meta (when it has one) lists no line: else the
    file was truncated (a failed copy?), and skipping it would silently drop its documents."""
    mp = fmt.meta_path(data_path)
    if not mp.is_file():
        return
    try:
        rows = len(np.load(mp, mmap_mode="r", allow_pickle=False))
    except Exception:  # an unreadable meta of an empty file: the meta checks name it if it matters
        return
    if rows:
        raise DataError(
            f"{data_path}: empty, but its meta lists {rows} lines (truncated by a failed copy?); restore the "
            f"file, or delete it and {mp.name}"
        )


def _cached_meta_path(data_path: Path) -> Path:
    h = hashlib.sha1(str(data_path.resolve()).encode()).hexdigest()[:16]
    return cache_root() / "meta" / f"{h}-{data_path.name[-200:]}.meta"  # a name fits 255 bytes


def _file_sizes(files: list[Path]) -> list[int]:
    sizes = []
    for p in files:
        try:
            sizes.append(p.stat().st_size)
        except OSError as e:
            raise DataError(f"{p}: cannot read data file ({e.strerror})") from None
    return sizes


# --------------------------------------------------------------------------- build


@dataclass
class _Layout:
    """The document table before it is written: all documents in file order, and the rows
    to take, in training order. Rows are gathered chunk by chunk (one 32-byte copy per
    row), so the full (D, 4) table never exists twice in memory."""

    files: list[Path]
    sizes: list[int]
    stats: IndexStats
    table: np.ndarray  # (all documents, 4) int64 in file order
    order: np.ndarray  # rows of `table` kept, in training order
    ends: np.ndarray

    def rows(self, start: int, stop: int) -> np.ndarray:
        whole_rows = self.table.view(np.dtype((np.void, 32))).reshape(-1)
        return np.take(whole_rows, self.order[start:stop]).view(np.int64).reshape(-1, 4)


def _layout(files: list[Path], min_length: int, shuffle: bool, seed: int, write: bool = True) -> _Layout:
    stats = IndexStats(files=len(files))
    sizes = _file_sizes(files)
    metas = []
    for p, size in zip(files, sizes):
        if size == 0:
            _check_empty(p)
            stats.empty_files += 1
            metas.append(np.zeros((0, 2), np.int64))
        elif write:
            metas.append(fmt.read_meta(ensure_meta(p, stats), p, size))
        elif (found := find_meta(p)) is not None:
            metas.append(fmt.read_meta(found, p, size))
        else:  # read-only (a plan): a missing meta is built in memory, not saved
            metas.append(fmt.build_meta(p))
    total = sum(len(m) for m in metas)
    table = np.empty((total, 4), dtype=np.int64)
    lens = np.empty(total, np.int64)
    start = 0
    for fid, (m, size) in enumerate(zip(metas, sizes)):
        n = len(m)
        if n:
            block = table[start : start + n]
            block[:, FILE] = fid
            block[:, LINE] = np.arange(n)
            block[:, OFFSET] = m[:, 0]
            block[:-1, NBYTES] = np.diff(m[:, 0])
            block[-1, NBYTES] = size - m[-1, 0]
            lens[start : start + n] = m[:, 1]
        start += n
    del metas
    stats.documents = total
    keep = lens >= max(1, min_length)
    stats.empty_documents = int((lens == 0).sum())
    stats.short_documents = total - int(keep.sum()) - stats.empty_documents
    index_dtype = np.int32 if total < 2**31 else np.int64  # half the memory traffic to shuffle
    order = (
        np.flatnonzero(keep).astype(index_dtype, copy=False) if not keep.all() else np.arange(total, dtype=index_dtype)
    )
    if shuffle:
        # In place; the same order as applying rng.permutation(len(order)).
        np.random.default_rng(seed).shuffle(order)
    ends = np.cumsum(lens[order], dtype=np.int64)
    stats.tokens = int(ends[-1]) if len(ends) else 0
    if stats.empty_files:
        log.warning("skipped %d empty data file(s)", stats.empty_files)
    if stats.empty_documents:
        log.warning("dropped %d document(s) with no tokens", stats.empty_documents)
    if stats.short_documents:
        log.info("dropped %d document(s) shorter than min_length=%d", stats.short_documents, min_length)
    if not len(ends):
        raise DataError(f"no documents left to train on in {len(files)} file(s) (after dropping empty and short ones)")
    return _Layout(files, sizes, stats, table, order, ends)


def build_index(
    files: list[Path], min_length: int = 1, shuffle: bool = True, seed: int = 0, write: bool = True
) -> DocIndex:
    """Read every meta and lay out the kept documents in training order (in memory); `write`:
    a missing meta is saved (else built in memory only)."""
    lay = _layout(files, min_length, shuffle, seed, write)
    return DocIndex([str(p) for p in files], lay.sizes, lay.rows(0, len(lay.order)), lay.ends, lay.stats)


_CHUNK_ROWS = 1 << 20


def _write_table(lay: _Layout, path: Path) -> None:
    """docs.npy written chunk by chunk: a standard .npy, never whole in memory."""
    n = len(lay.order)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.dtype(np.int64).str, "fortran_order": False, "shape": (n, 4)}
        )
        for start in range(0, n, _CHUNK_ROWS):
            f.write(lay.rows(start, min(n, start + _CHUNK_ROWS)).tobytes())


def _cache_key(files: list[Path], min_length: int, shuffle: bool, seed: int) -> str:
    """Everything the table depends on: settings, and each file's and meta's identity."""
    h = hashlib.sha256()
    h.update(json.dumps([INDEX_VERSION, min_length, shuffle, seed]).encode())
    for p in files:
        try:
            st = p.stat()
        except OSError as e:  # e.g. a dangling symlink
            raise DataError(f"{p}: cannot read data file ({e.strerror})") from None
        ident = [str(p.resolve()), st.st_size, st.st_mtime_ns]
        if st.st_size:
            mst = ensure_meta(p).stat()
            ident += [mst.st_size, mst.st_mtime_ns]
        h.update(json.dumps(ident).encode())
    return h.hexdigest()[:24]


def _load_entry(target: Path):
    info = json.loads((target / "info.json").read_text())
    docs = np.load(target / "docs.npy", mmap_mode="r")
    ends = np.load(target / "ends.npy", mmap_mode="r")
    if docs.ndim != 2 or docs.shape != (len(ends), 4) or not isinstance(info.get("stats"), dict):
        raise ValueError(f"docs {docs.shape} / ends {ends.shape} do not match")
    return info, docs, ends


def open_index(
    files: list[Path],
    min_length: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
    _retried: bool = False,
    write: bool = True,
) -> DocIndex:
    """The document table, from the cache when present (memory-mapped), else built and cached.

    Safe to call from every rank at once: one builds under a file lock, the rest map it.
    `write=False` (a plan) writes nothing, not even a lock: the cached table when there is
    one, else the table built in memory.
    """
    import shutil

    from filelock import FileLock

    from tokentrain.utils.atomic import atomic_dir

    root = Path(cache_dir) if cache_dir else cache_root() / "index"
    if not write:
        return _peek_index(files, min_length, shuffle, seed, root)
    root.mkdir(parents=True, exist_ok=True)
    lock_name = hashlib.sha1("\n".join(str(p.resolve()) for p in files).encode()).hexdigest()[:16]
    with FileLock(str(root / f"{lock_name}.lock")):
        target = root / _cache_key(files, min_length, shuffle, seed)
        if rebuild and target.exists():
            shutil.rmtree(target)
        if not (target / "info.json").exists():
            t0 = time.perf_counter()
            lay = _layout(files, min_length, shuffle, seed)
            with atomic_dir(target) as tmp:
                _write_table(lay, tmp / "docs.npy")
                np.save(tmp / "ends.npy", lay.ends)
                info = {"files": [str(p) for p in files], "file_sizes": lay.sizes, "stats": vars(lay.stats)}
                (tmp / "info.json").write_text(json.dumps(info))
            log.info(
                "indexed %d documents in %d files in %.2fs -> %s",
                len(lay.order),
                len(files),
                time.perf_counter() - t0,
                target,
            )
            del lay
    try:
        info, docs, ends = _load_entry(target)
    except (OSError, ValueError, EOFError, KeyError, TypeError) as e:  # a damaged cache entry: rebuild it
        if _retried:
            raise DataError(
                f"{target}: index cache entry unreadable right after it was rebuilt ({e}); check the disk of "
                "TOKENTRAIN_CACHE (or point it elsewhere)"
            ) from None
        log.warning("index cache entry %s is damaged (%s: %s); rebuilding it", target, type(e).__name__, e)
        return open_index(files, min_length, shuffle, seed, cache_dir, rebuild=True, _retried=True)
    # The key is made of resolved paths, so the cached table may have been built from another
    # working directory: name the files as this caller does, never by the stored (maybe relative) names.
    return DocIndex([str(p) for p in files], info["file_sizes"], docs, ends, IndexStats(**info["stats"]), target)


def _peek_index(files: list[Path], min_length: int, shuffle: bool, seed: int, root: Path) -> DocIndex:
    """open_index without writing: the cached table if every file's meta and the entry exist."""
    sizes = _file_sizes(files)  # a file that cannot be read: the one-line DataError a run gives
    if all(size == 0 or find_meta(p) is not None for p, size in zip(files, sizes)):
        target = root / _cache_key(files, min_length, shuffle, seed)
        try:
            info, docs, ends = _load_entry(target)
            return DocIndex(
                [str(p) for p in files], info["file_sizes"], docs, ends, IndexStats(**info["stats"]), target
            )
        except (OSError, ValueError, EOFError, KeyError, TypeError):
            pass  # none (or damaged): built in memory below
    return build_index(files, min_length, shuffle, seed, write=False)
