"""Where tokentrain keeps what it derives from a corpus (indexes, metas of read-only folders,
content digests, per-file summaries): its own module because each of those keepers needs it
and none should import another for it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$TOKENTRAIN_CACHE or ~/.cache/tokentrain."""
    env = os.environ.get("TOKENTRAIN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tokentrain"
