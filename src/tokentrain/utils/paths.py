"""How an error names a path the user gave.

Relative paths resolve against the working directory (as in XTuner and every shell tool),
which under Slurm or a launcher script is often not the folder the user thinks: an error
that says only `data/x` hides where it looked. `shown` adds the absolute path and the
working directory to a relative path; an absolute one is shown as it is."""

from __future__ import annotations

import os
from pathlib import Path


def shown(path: str | os.PathLike) -> str:
    """`data/x (= /home/u/run/data/x; relative to the working directory /home/u/run)`, or the path as given."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(path)
    cwd = Path.cwd()
    return f"{path} (= {cwd / p}; relative to the working directory {cwd})"
