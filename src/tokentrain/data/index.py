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
from tokentrain.errors import DataError

log = logging.getLogger(__name__)

INDEX_VERSION = 1
FILE, LINE, OFFSET, NBYTES = range(4)


def cache_root() -> Path:
    """Where indexes (and metas for read-only folders) go: $TOKENTRAIN_CACHE or ~/.cache/tokentrain."""
    env = os.environ.get("TOKENTRAIN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tokentrain"


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
    mp = fmt.meta_path(data_path)
    if mp.exists():
        return mp
    cached = _cached_meta_path(data_path)
    if cached.exists() and cached.stat().st_mtime_ns >= data_path.stat().st_mtime_ns:
        return cached
    meta = fmt.build_meta(data_path)
    if stats is not None:
        stats.built_metas += 1
    try:
        fmt.save_meta(meta, mp)
        log.info("%s: no meta; built %s (%d lines)", data_path, mp.name, len(meta))
        return mp
    except OSError:
        cached.parent.mkdir(parents=True, exist_ok=True)
        fmt.save_meta(meta, cached)
        log.info("%s: no meta and the folder is read-only; built it into %s", data_path, cached)
        return cached


def _cached_meta_path(data_path: Path) -> Path:
    h = hashlib.sha1(str(data_path.resolve()).encode()).hexdigest()[:16]
    return cache_root() / "meta" / f"{h}-{data_path.name}.meta"


def _file_sizes(files: list[Path]) -> list[int]:
    sizes = []
    for p in files:
        try:
            sizes.append(p.stat().st_size)
        except OSError as e:
            raise DataError(f"{p}: cannot read data file ({e.strerror})") from None
    return sizes


# --------------------------------------------------------------------------- build


def build_index(files: list[Path], min_length: int = 1, shuffle: bool = True, seed: int = 0) -> DocIndex:
    """Read every meta and lay out the kept documents in training order (in memory)."""
    stats = IndexStats(files=len(files))
    sizes = _file_sizes(files)
    blocks, lens = [np.zeros((0, 4), np.int64)], [np.zeros(0, np.int64)]
    for fid, (p, size) in enumerate(zip(files, sizes)):
        if size == 0:
            stats.empty_files += 1
            continue
        meta = fmt.read_meta(ensure_meta(p, stats), p, size)
        block = np.empty((len(meta), 4), dtype=np.int64)
        block[:, FILE] = fid
        block[:, LINE] = np.arange(len(meta))
        block[:, OFFSET] = meta[:, 0]
        block[:, NBYTES] = np.diff(meta[:, 0], append=size)
        blocks.append(block)
        lens.append(meta[:, 1])
    docs, lens = np.concatenate(blocks), np.concatenate(lens)
    stats.documents = len(docs)
    keep = lens >= max(1, min_length)
    stats.empty_documents = int((lens == 0).sum())
    stats.short_documents = int((~keep).sum()) - stats.empty_documents
    if not keep.all():
        docs, lens = docs[keep], lens[keep]
    if shuffle:
        perm = np.random.default_rng(seed).permutation(len(docs))
        docs, lens = docs[perm], lens[perm]
    ends = np.cumsum(lens, dtype=np.int64)
    stats.tokens = int(ends[-1]) if len(ends) else 0
    if stats.empty_files:
        log.warning("skipped %d empty data file(s)", stats.empty_files)
    if stats.empty_documents:
        log.warning("dropped %d document(s) with no tokens", stats.empty_documents)
    if stats.short_documents:
        log.info("dropped %d document(s) shorter than min_length=%d", stats.short_documents, min_length)
    if not len(ends):
        raise DataError(f"no documents left to train on in {len(files)} file(s) (after dropping empty and short ones)")
    return DocIndex([str(p) for p in files], sizes, docs, ends, stats)


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


def open_index(
    files: list[Path],
    min_length: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
) -> DocIndex:
    """The document table, from the cache when present (memory-mapped), else built and cached.

    Safe to call from every rank at once: one builds under a file lock, the rest map it.
    """
    import shutil

    from filelock import FileLock

    from tokentrain.utils.atomic import atomic_dir

    root = Path(cache_dir) if cache_dir else cache_root() / "index"
    root.mkdir(parents=True, exist_ok=True)
    lock_name = hashlib.sha1("\n".join(str(p.resolve()) for p in files).encode()).hexdigest()[:16]
    with FileLock(str(root / f"{lock_name}.lock")):
        target = root / _cache_key(files, min_length, shuffle, seed)
        if rebuild and target.exists():
            shutil.rmtree(target)
        if not (target / "info.json").exists():
            t0 = time.perf_counter()
            index = build_index(files, min_length, shuffle, seed)
            with atomic_dir(target) as tmp:
                np.save(tmp / "docs.npy", index.docs)
                np.save(tmp / "ends.npy", index.ends)
                info = {"files": index.files, "file_sizes": index.file_sizes, "stats": vars(index.stats)}
                (tmp / "info.json").write_text(json.dumps(info))
            log.info("indexed %d documents in %d files in %.2fs -> %s", len(index), len(files), time.perf_counter() - t0, target)
    info = json.loads((target / "info.json").read_text())
    docs = np.load(target / "docs.npy", mmap_mode="r")
    ends = np.load(target / "ends.npy", mmap_mode="r")
    # The key is made of resolved paths, so the cached table may have been built from another
    # working directory: name the files as this caller does, never by the stored (maybe relative) names.
    return DocIndex([str(p) for p in files], info["file_sizes"], docs, ends, IndexStats(**info["stats"]), target)
