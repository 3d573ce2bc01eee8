"""No code from checkpoints: every `.pt` file is opened with ``torch.load(weights_only=True)``
under an explicit allow-list of the globals its engine writes, before anyone loads it.

DeepSpeed unpickles its own files with ``weights_only=False``: a crafted
``mp_rank_00_model_states.pt`` would run its code on resume or convert. Checked first,
such a file is refused, naming it and the global it wants. The check maps the files
(``mmap=True``), so it reads the pickles, not the tensor data.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch


def unsafe_file(folder: Path, allowed: list) -> str | None:
    """Why one `.pt` file of `folder` must not be loaded (naming it), or None when all are safe."""
    for path in sorted(Path(folder).rglob("*.pt")):
        why = _check(path, allowed)
        if why:
            return why
    return None


def _check(path: Path, allowed: list) -> str | None:
    try:
        with torch.serialization.safe_globals(allowed):
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # a legacy (non-zip) file cannot be mapped: read it
                    raise
                torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL (\S+)", str(e)) or re.search(r"global[s]? (\S+)", str(e))
        what = f"pickled object {m.group(1)}" if m else "pickled objects"
        return (
            f"{path}: refused: it holds {what}, outside the allow-list of what tokentrain's engines write "
            "(loading it could run code); do not use this checkpoint"
        )
    except Exception as e:  # truncated, not a torch file, ...: unreadable either way
        return f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None
