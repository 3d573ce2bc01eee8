"""One answer to "did this write fail because the disk is full?", for every writer.

Libraries report a full disk in their own words: ``OSError`` with ENOSPC or EDQUOT, safetensors'
own error type ("No space left", "os error 28"), torch.save's "file write failed" or
"unexpected pos". The free space left is trusted too, below what the write needed."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

FULL = (errno.ENOSPC, errno.EDQUOT)
UNWRITABLE = (*FULL, errno.EROFS, errno.EACCES)  # a place the run cannot write to: one line, not a bug
_SAID = ("No space left", "os error 28", "file write failed", "unexpected pos")


def free_bytes(where: Path) -> int | None:
    try:
        return shutil.disk_usage(where).free
    except OSError:
        return None


def disk_full(e: BaseException, where: Path | None = None, need: int = 1 << 20) -> bool:
    """Whether `e` (from writing under `where`) means the disk is full: by its errno, its
    words, or less than `need` bytes left there."""
    if getattr(e, "errno", None) in FULL or any(m in str(e) for m in _SAID):
        return True
    free = free_bytes(where) if where is not None else None
    return free is not None and (free == 0 or free < need)


def what_failed(e: OSError) -> str:
    """The cause as a one-line error says it."""
    return "no space left on device" if e.errno in FULL else (e.strerror or type(e).__name__)
