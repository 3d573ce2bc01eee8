"""No code from checkpoints, by construction and by a check before anyone loads them.

By construction: `weights_only_everywhere` (called first thing by `train`, `convert`, `generate` and `chat`, on
every rank) sets PyTorch's process-wide ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``: every
`torch.load` of the process -- ours, DeepSpeed's (which passes ``weights_only=False``),
DCP's -- then runs the restricted unpickler, whatever its caller asked. The globals our
engines legitimately write are registered with `allow` (DeepSpeed's, when it is used); a
file wanting any other global fails to load instead of running it.

The check (`unsafe_file`), run on a checkpoint before it is used, turns that into one line
naming the file: every `.pt` file is opened weights-only under the engine's allow-list
(mapped, ``mmap=True``, so it reads the pickles, not the tensor data), and the walk
follows symlinked files and folders -- refusing any link that leaves the checkpoint
folder (a ``ds/`` linked to a folder elsewhere is what `tar`/`rsync -l` can carry). A hard
link is a plain file to both: checked, and loaded weights-only.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

from tokentrain.errors import UnsafeCheckpointError

FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
FORCE_NOT = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"  # torch refuses both set; ours wins


def weights_only_everywhere() -> None:
    """Every later `torch.load` in this process (and its children) loads weights only."""
    os.environ.pop(FORCE_NOT, None)
    os.environ[FORCE] = "1"


def allow(globals_: list) -> None:
    """Let weights-only loads of this process build these (an engine's own pickled classes)."""
    if globals_:
        import torch

        torch.serialization.add_safe_globals(globals_)


def unsafe_file(folder: Path, allowed: list) -> str | None:
    """Why `folder` must not be loaded (a link leaving it, or a `.pt` file holding a pickled
    global outside `allowed`, naming it), or None when it is safe."""
    try:
        files = list(walk(Path(folder)))
    except _Escape as e:
        return str(e)
    for path in sorted(p for p in files if p.name.endswith(".pt")):
        why = _check(path, allowed)
        if why:
            return why
    return None


class _Escape(Exception):
    pass


def walk(folder: Path) -> Iterator[Path]:
    """Every file under `folder`, following symlinks (each real folder once); raises _Escape
    at a link whose target lies outside `folder`."""
    root = folder.resolve()
    seen: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here = Path(dirpath)
        real = here.resolve()
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        for name in (*dirnames, *filenames):
            p = here / name
            if p.is_symlink():
                target = p.resolve()
                if not target.is_relative_to(root):
                    raise _Escape(
                        f"{p}: refused: a link to {target}, outside the checkpoint {folder} (loading through it "
                        "could run code from elsewhere); copy the files in (cp -rL) if you trust them"
                    )
        for name in filenames:
            yield here / name


def _check(path: Path, allowed: list) -> str | None:
    import torch  # here: a command that calls weights_only_everywhere checks its input before torch loads

    # Only what `allow` has not registered for the process: leaving the context removes them.
    registered = torch.serialization.get_safe_globals()
    try:
        with torch.serialization.safe_globals([g for g in allowed if g not in registered]):
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # a legacy (non-zip) file cannot be mapped: read it
                    raise
                torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        return refusal(path, e)
    except Exception as e:  # truncated, not a torch file, ...: unreadable either way
        return f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def refusal(path: Path, e: BaseException) -> str:
    """The one line for a file a weights-only load refused."""
    m = re.search(r"GLOBAL (\S+)", str(e)) or re.search(r"global[s]? (\S+)", str(e))
    what = f"pickled object {m.group(1)}" if m else "pickled objects"
    return (
        f"{path}: refused: it holds {what}, outside the allow-list of what tokentrain's engines write "
        "(loading it could run code); do not use this checkpoint"
    )


@contextlib.contextmanager
def refused_as_unsafe(folder: Path):
    """A file that a (forced) weights-only load refused, inside an engine's own loader: one line."""
    try:
        yield
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(refusal(folder, e)) from None
