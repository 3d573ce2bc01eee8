"""Writes InternLM-format shards: JSON lines plus their `.meta`, each renamed into place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson

from tokentrain.data import format as fmt
from tokentrain.utils.atomic import atomic_file


def encode_line(tokens) -> bytes:
    """One document as a canonical JSON line (the form the fast reader path expects)."""
    return orjson.dumps({"tokens": np.asarray(tokens, dtype=np.int64)}, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"


class ShardWriter:
    """Streams documents into ``{stem}-00000.bin``, ``{stem}-00001.bin``, ... of at most
    ``shard_bytes`` each (a shard holds at least one document). Each shard and its meta
    are written aside and renamed when complete, so a failure never leaves a partial one."""

    def __init__(self, out: str | Path, stem: str, shard_bytes: int = 256 << 20):
        self.out, self.stem, self.shard_bytes = Path(out), stem, shard_bytes
        self.out.mkdir(parents=True, exist_ok=True)
        self.paths: list[Path] = []
        self.documents = self.tokens = 0
        self._lines: list[bytes] = []
        self._rows: list[tuple[int, int]] = []
        self._size = 0

    def add(self, tokens) -> None:
        line = encode_line(tokens)
        if self._lines and self._size + len(line) > self.shard_bytes:
            self._flush()
        self._rows.append((self._size, len(tokens)))
        self._lines.append(line)
        self._size += len(line)
        self.documents += 1
        self.tokens += len(tokens)

    def _flush(self) -> None:
        path = self.out / f"{self.stem}-{len(self.paths):05d}.bin"
        with atomic_file(path) as f:
            f.writelines(self._lines)
        fmt.save_meta(np.asarray(self._rows, dtype=np.int64).reshape(-1, 2), fmt.meta_path(path))
        self.paths.append(path)
        self._lines, self._rows, self._size = [], [], 0

    def close(self) -> list[Path]:
        if self._lines:
            self._flush()
        return self.paths
