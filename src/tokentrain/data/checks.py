"""Checks of the training and validation sets before the first step.

Token ids against the model's vocabulary are checked first, before the model loads, from
each file's stored summary (`check_stored_ids`: a stat and a small read per file; exit 2).
Then each failure is a one-line `DataError` (exit 3) naming the set, found before any training
time is spent and before anything is written: a set with no target token (every token
negative: "training" would only skip steps and export the untrained model), validation
token ids outside the vocabulary (else the first evaluation fails after hours of
training), a validation set smaller than one pack.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np

from tokentrain.data.format import IGNORE_INDEX
from tokentrain.errors import ConfigError, DataError, TokentrainError
from tokentrain.utils.disk import UNWRITABLE, free_bytes, what_failed


def _cache_name() -> str:
    from tokentrain.data.cache import cache_root

    root = cache_root()
    return f"TOKENTRAIN_CACHE={root}" if os.environ.get("TOKENTRAIN_CACHE") else f"the cache folder {root}"


def check_cache_root() -> None:
    """The index cache must be a folder we can write in: a usage error (exit 2) otherwise, before any work."""
    from tokentrain.data.cache import cache_root

    root, name = cache_root(), _cache_name()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{name}: is a file; point TOKENTRAIN_CACHE at a folder")
    probe = root
    while not probe.exists():
        probe = probe.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tokentrain-probe-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ConfigError(
            f"{name}: not writable ({e.strerror}); point TOKENTRAIN_CACHE at a folder you can write in"
        ) from None


@contextlib.contextmanager
def naming_errors(settings, key: str):
    """Around building the set of config key `key`: its errors name the key and folder when
    they do not already, and a full or unwritable disk (index cache, metas) is one line."""
    from tokentrain.data.cache import cache_root

    try:
        yield
    except DataError as e:
        if str(settings.folder) in str(e):
            raise
        raise DataError(f"{key} = {settings.folder!r}: {e}") from None
    except OSError as e:
        if e.errno not in UNWRITABLE:
            raise
        in_cache = e.filename is not None and Path(e.filename).resolve().is_relative_to(cache_root().resolve())
        if e.filename is None:
            free = free_bytes(cache_root())
            in_cache = free is not None and free < (1 << 20)
        where = _cache_name() if in_cache else f"{key} = {settings.folder!r}"
        named = f" ({e.filename})" if e.filename else ""
        raise TokentrainError(
            f"{where}: {what_failed(e)} while writing the data index or a meta{named}; "
            "free space or point TOKENTRAIN_CACHE elsewhere"
        ) from None


def _has_target(dataset) -> bool:
    return any(bool((np.asarray(dataset[k]["labels"]) != IGNORE_INDEX).any()) for k in range(len(dataset)))


def check_datasets(
    train_set, val_set, vocab_size: int, train_folder: str, val_folder: str | None, sources: list | None = None
) -> None:
    """Every set (every source of a `datasets` mixture) has a target token; every validation id
    is < the vocabulary size."""
    # A mixture is checked source by source: one source with no target would only dilute the others.
    parts = getattr(train_set, "datasets", None)
    if parts is not None and sources:
        folders = [
            f"datasets[{i}] ({n!r}): folder {s['folder']!r}" for i, (n, s) in enumerate(zip(train_set.names, sources))
        ]
    else:
        parts, folders = [train_set], [f"dataset_folder = {train_folder!r}"]
    for part, where in zip(parts, folders):
        if not _has_target(part):  # stops at the first sample that has one
            raise DataError(
                f"{where}: no target token in any of its {len(part)} sample(s) (every token negative, i.e. "
                "masked); training would learn nothing. Check the sign convention of the data"
                + (", or drop the source" if len(parts) > 1 else "")
            )
    if val_set is None:
        return
    found = False
    for k in range(len(val_set)):
        s = val_set[k]
        labels = np.asarray(s["labels"])
        found = found or bool((labels != IGNORE_INDEX).any())
        top = max(int(np.asarray(s["input_ids"]).max(initial=0)), int(labels.max(initial=0)))
        if top >= vocab_size:
            src = val_set.sources(k)
            where = ", ".join(f"{f}:{line}" for f, line in src[:3])
            raise DataError(
                f"val_dataset_folder = {val_folder!r}: token id {top} >= the model's vocabulary size {vocab_size} "
                f"(validation sample {k}: {where}); fix the data or use the tokenizer it was made with"
            )
    if not found:
        raise DataError(
            f"val_dataset_folder = {val_folder!r}: no target token in any of its {len(val_set)} sample(s) (every "
            "token negative, i.e. masked); its loss would be 0. Check the sign convention of the data"
        )


def check_stored_ids(datasets: list, vocab_size: int, model: str) -> tuple[int, int]:
    """Every file whose summary is stored (`data check`, or a meta tokentrain built) has ids <
    `vocab_size`: a ConfigError naming the file, the line and the id otherwise. Files with no
    summary are not read here (a terabyte would take hours at start); their ids are checked
    batch by batch as training reads them. Returns (files checked, files without a summary)."""
    from tokentrain.data.summary import stored_max_id

    checked = missing = 0
    seen: set[str] = set()
    for ds in datasets:
        for part in getattr(ds, "datasets", None) or [ds]:
            for f in part.index.files:
                if f in seen:
                    continue
                seen.add(f)
                got = stored_max_id(Path(f))
                if got is None:
                    missing += 1
                    continue
                checked += 1
                top, at = got
                if top >= vocab_size and at is not None:
                    raise ConfigError(
                        f"{f}: line {at[0]} (byte {at[1]}): token id {top} >= the vocabulary size {vocab_size} of "
                        f"{model}; tokenize the data with this model's tokenizer, or train a model whose "
                        "vocabulary holds it (`tokentrain data check --config CFG` lists every such file)"
                    )
    return checked, missing
