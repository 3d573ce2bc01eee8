"""The floating-point dtypes a setting may name (`dtype`, `export_dtype`, `convert --dtype`): one table.

The names are plain strings so the config schema and the CLI can check them without importing
torch; `torch_dtype` turns a name into the torch dtype when it is needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # each is the name of the torch dtype


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called `name` (one of DTYPE_NAMES; KeyError for any other)."""
    import torch

    if name not in DTYPE_NAMES:
        raise KeyError(name)
    return getattr(torch, name)
