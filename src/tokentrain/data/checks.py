"""Checks of the training and validation sets before the first step.

Each failure is a one-line `DataError` (exit 3) naming the set, found before any training
time is spent and before anything is written: a set with no target token (every token
negative: "training" would only skip steps and export the untrained model), validation
token ids outside the vocabulary (else the first evaluation fails after hours of
training), a validation set smaller than one pack.
"""

from __future__ import annotations

import numpy as np

from tokentrain.data.format import IGNORE_INDEX
from tokentrain.errors import DataError


def build_named(settings, key: str):
    """build_dataset, with the set's config key and folder in any error that does not name it."""
    from tokentrain.data.dataset import build_dataset

    try:
        return build_dataset(settings)
    except DataError as e:
        if str(settings.folder) in str(e):
            raise
        raise DataError(f"{key} = {settings.folder!r}: {e}") from None


def _has_target(dataset) -> bool:
    return any(bool((np.asarray(dataset[k]["labels"]) != IGNORE_INDEX).any()) for k in range(len(dataset)))


def check_datasets(train_set, val_set, vocab_size: int, train_folder: str, val_folder: str | None) -> None:
    """Every set has a target token; every validation id is < the vocabulary size."""
    if not _has_target(train_set):  # stops at the first sample that has one
        raise DataError(
            f"dataset_folder = {train_folder!r}: no target token in any of its {len(train_set)} sample(s) (every "
            "token negative, i.e. masked); training would learn nothing. Check the sign convention of the data"
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
