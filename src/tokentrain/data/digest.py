"""The SHA-256 of a whole data file, computed once per version of the file and cached.

The resume fingerprint must see a document changed anywhere in a file, even one with the
same length (the meta is the same then). Reading every byte at every start would cost
minutes on a large corpus, so the digest is kept in the cache (``TOKENTRAIN_CACHE/digest``)
under the file's real path, with the file's identity: device, inode, size, mtime and
*ctime*. A write to the file changes its ctime, and no user call can set the ctime back
(``touch -r`` / ``os.utime`` restore only mtime), so a cached digest is never stale; any
other change of identity (a copy, a chmod) only costs one more read.

Cost: one read of each new or changed file per node (SHA-256 runs at ~1.5 GB/s on one core
here; the disk is usually slower), then one `stat` per file per start. Ranks on a node take
turns through a file lock, so a file is hashed once, not once per rank.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

_CHUNK = 8 << 20


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _entry(real: str) -> Path:
    from tokentrain.data.cache import cache_root

    return cache_root() / "digest" / f"{hashlib.sha1(real.encode()).hexdigest()[:20]}.json"


def _cached(entry: Path, ident: list[int]) -> str | None:
    try:
        rec = json.loads(entry.read_text())
    except (OSError, ValueError):
        return None
    return rec.get("digest") if isinstance(rec, dict) and rec.get("identity") == ident else None


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of every byte of `path`."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """The (first 32 hex digits of the) SHA-256 of `path`, from the cache when the file is unchanged."""
    from filelock import FileLock

    from tokentrain.utils.atomic import atomic_file

    real = os.path.realpath(path)
    entry = _entry(real)
    ident = _identity(os.stat(real))
    found = _cached(entry, ident)
    if found:
        return found
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry.with_suffix(".lock"))):
        found = _cached(entry, ident)  # another rank may have just written it
        if found:
            return found
        digest = sha256_file(Path(real))[:32]
        if _identity(os.stat(real)) != ident:  # changed while read: the digest is of nothing stable
            return digest
        with atomic_file(entry, "w") as f:
            json.dump({"path": real, "identity": ident, "digest": digest}, f)
        log.debug("hashed %s (%d bytes)", real, ident[2])
    return digest
