"""Write-aside-then-rename helpers: a reader sees the old file or the new one, never half.

`tempfile` creates its files 0600 and folders 0700 (private by design); what we write is
output for others too (corpus shards, checkpoints, the exported model), so it gets the
process umask's permissions, as `open()` and `mkdir` would give.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def current_umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no other way to read it: set and restore at once
    os.umask(mask)
    return mask


def with_umask(path: str | os.PathLike, folder: bool = False) -> None:
    """Give a tempfile-made file (0600) or folder (0700) the permissions open()/mkdir would."""
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


def make_temp_dir(prefix: str, dir: str | os.PathLike) -> Path:
    """tempfile.mkdtemp beside the target, with umask permissions."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=dir))
    with_umask(tmp, folder=True)
    return tmp


def _short(name: str) -> str:
    """The start of a name, for a temporary file beside it: a name of 240+ characters plus the
    random part and suffix would pass the 255-byte limit (ENAMETOOLONG) where the name itself fits."""
    return name if len(name.encode()) <= 100 else name.encode()[:100].decode(errors="ignore")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on clean exit fsync it and rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{_short(path.name)}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; on clean exit rename it to `path`.

    If `path` appeared meanwhile (another process won the race), ours is discarded.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(f".{_short(path.name)}.", path.parent)
    try:
        yield tmp
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
