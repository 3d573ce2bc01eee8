"""`data check`: every file summarised (from the cache when unchanged, else read in parallel
over files and byte ranges), then the summaries held against a model: token ids within
its vocabulary, documents with a target, lengths against ``max_length``.

The model's numbers come from its config.json alone (no weights, no transformers import
when the file is plain JSON), so a re-check of an unchanged corpus costs a stat and a small
read per file.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokentrain.data import format as fmt
from tokentrain.data import summary as sm
from tokentrain.data.inspect import Problem
from tokentrain.errors import ConfigError, DataError

_MIN_CHUNK, _MAX_CHUNK = 64 << 10, 16 << 20  # bytes per range a worker reads


def summarize(files: list[Path], workers: int = 1, progress=None) -> tuple[list[sm.Summary], int]:
    """The summary of each file, in order: stored ones as they are, the others read (split in
    ranges over `workers` processes) and stored; and how many were stored ones."""
    out: list[sm.Summary | None] = [None] * len(files)
    pending: list[tuple[int, int, Path | None, list]] = []  # file number, size, meta, key
    stored = 0
    for i, p in enumerate(files):
        try:
            size = p.stat().st_size
        except OSError as e:  # e.g. a dangling symlink
            out[i] = sm.Summary(problems=[[None, None, f"cannot read data file ({e.strerror})", False]])
            continue
        if size == 0:
            out[i] = sm.Summary()
            continue
        mp = sm.usable_meta(p)
        key = sm.file_key(p, mp)
        found = sm.load(p, key)
        if found is not None:
            out[i] = found
            stored += 1
            if progress is not None:
                progress.update(size, found.documents)
        else:
            pending.append((i, size, mp, key))
    total = sum(size for _, size, _, _ in pending)
    chunk = min(_MAX_CHUNK, max(_MIN_CHUNK, total // max(1, 8 * workers)))
    jobs: list[sm.Range] = []
    todo: list[tuple[int, list, sm.Summary, int]] = []  # file number, key, its summary, its ranges
    for i, size, mp, key in pending:  # one meta in memory at a time: a terabyte's are gigabytes
        head = sm.Summary()
        meta = None
        if mp is None:
            head.problems.append(
                [
                    None,
                    None,
                    f"no meta file {fmt.meta_path(files[i]).name}; build it with `tokentrain data index`",
                    False,
                ]
            )
        else:
            try:
                meta = fmt.read_meta(mp, files[i], size)
            except DataError as e:
                head.problems.append([None, None, str(e).removeprefix(f"{mp}: "), True])
        rs = sm.ranges(files[i], mp if meta is not None else None, meta, size, chunk)
        jobs.extend(rs)
        todo.append((i, key, head, len(rs)))
    parts = iter(list(_run(jobs, workers, progress)))
    for i, key, head, n in todo:
        for _ in range(n):
            head.add(next(parts), line_base=head.newlines)
        sm.store(files[i], key, head)
        out[i] = head
    return [s for s in out if s is not None], stored


def _run(jobs: list[sm.Range], workers: int, progress):
    """Each range's summary, in order; ranges read by `workers` processes."""
    pool = None
    results: Iterator[sm.Summary] = map(sm.scan_range, jobs)
    if workers > 1 and len(jobs) > 1:
        pool = multiprocessing.get_context("fork").Pool(min(workers, len(jobs)))
        results = pool.imap(sm.scan_range, jobs)
    try:
        for r, s in zip(jobs, results):
            if progress is not None:
                progress.update(r.hi - r.lo, s.documents)
            yield s
    finally:
        if pool is not None:
            pool.terminate()


# --------------------------------------------------------------------------- the model


@dataclass
class Limits:
    """What the data is checked against; None: not checked."""

    vocab_size: int | None = None
    max_length: int | None = None
    pack_to_max_length: bool = True
    zero_is_target: bool = False
    model: str = ""


def vocab_size_of(model: str, trust_remote_code: bool = False) -> int:
    """The vocabulary size in a model folder's config.json (its text model's, for a
    multimodal one), read as plain JSON; through transformers only when that fails."""
    cfg_file = Path(model) / "config.json"
    try:
        raw = json.loads(cfg_file.read_text())
        n = raw.get("vocab_size") or (raw.get("text_config") or {}).get("vocab_size")
        if isinstance(n, int) and n > 0:
            return n
    except (OSError, ValueError, AttributeError):
        pass
    from tokentrain.model.lm import read_config

    cfg = read_config(model, trust_remote_code)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(cfg, "vocab_size", None)
    if not isinstance(n, int) or n <= 0:
        raise ConfigError(f"{model}: its config.json gives no vocab_size; check the model folder")
    return n


def model_problems(
    where: str, files: list[Path], sums: list[sm.Summary], limits: Limits
) -> tuple[list[Problem], list[str]]:
    """The data's problems with the model (ids over its vocabulary; no target in the dataset
    `where`) and notes (documents without a target, documents longer than max_length)."""
    problems: list[Problem] = []
    notes: list[str] = []
    v = limits.vocab_size
    if v is not None:
        for p, s in zip(files, sums):
            if s.max_id >= v and s.max_at is not None:
                problems.append(
                    Problem(
                        str(p),
                        s.max_at[0],
                        s.max_at[1],
                        f"token id {s.max_id} (the file's largest) >= the vocabulary size {v} of {limits.model}; "
                        "tokenize the data with this model's tokenizer, or train a model whose vocabulary holds it",
                    )
                )
    docs = sum(s.documents - s.empty_documents for s in sums)
    bare = sum((s.no_target_zero if limits.zero_is_target else s.no_target) - s.empty_documents for s in sums)
    if limits.model and docs and bare == docs:  # (without a model: the format check alone, as before)
        problems.append(
            Problem(
                where,
                None,
                None,
                "no document has a target token (every token after the first is negative, i.e. masked); training "
                "would learn nothing. Check the sign convention of the data"
                + ("" if limits.zero_is_target else " (or zero_is_target)"),
            )
        )
    elif limits.model and bare:
        notes.append(f"{bare} of {docs} non-empty document(s) have no target token (they add no loss)")
    if limits.max_length is not None:
        long, longest = _longer_than(files, sums, limits.max_length)
        if long:
            what = (
                "packed: each is cut across consecutive samples of max_length, none of it lost"
                if limits.pack_to_max_length
                else "pack_to_max_length=False: each is truncated to max_length, the rest is not trained"
            )
            notes.append(
                f"{long} document(s) longer than max_length={limits.max_length} (longest {longest} tokens); {what}"
            )
    return problems, notes


def _longer_than(files: list[Path], sums: list[sm.Summary], max_length: int) -> tuple[int, int]:
    """Documents longer than `max_length`: counted from the meta of the files whose longest is."""
    long = 0
    for p, s in zip(files, sums):
        mp = sm.usable_meta(p)
        if s.longest > max_length and mp is not None:
            try:
                long += int((np.load(mp, mmap_mode="r")[:, 1] > max_length).sum())
            except (OSError, ValueError, IndexError):
                pass  # its meta problem is already reported
    return long, max((s.longest for s in sums), default=0)


def all_problems(files: list[Path], sums: list[sm.Summary]) -> list[Problem]:
    """The format problems of every file, as `data check` always listed them."""
    out = []
    for p, s in zip(files, sums):
        for line, byte, what, on_meta in s.problems:
            out.append(Problem(str(fmt.meta_path(p)) if on_meta else str(p), line, byte, what))
    return out


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
