"""Deterministic synthetic InternLM-format data, for tests and benchmarks.

Document lengths are lognormal around `mean_length`; each document is BOS (1), an
optional leading negative "prompt" span, positive tokens, EOS (2). Same arguments, same
bytes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from tokentrain.data import format as fmt
from tokentrain.data.writer import encode_line
from tokentrain.utils.atomic import atomic_file


def synth_documents(rng: np.random.Generator, n: int, mean_length: float, vocab_size: int, sigma: float = 1.0):
    mu = math.log(mean_length) - sigma**2 / 2
    lengths = np.maximum(2, rng.lognormal(mu, sigma, n).astype(np.int64))
    prompt_frac = np.where(rng.random(n) < 0.5, rng.random(n) * 0.5, 0.0)
    for length, frac in zip(lengths.tolist(), prompt_frac.tolist()):
        toks = rng.integers(3, vocab_size, length, dtype=np.int64)
        toks[0], toks[-1] = 1, 2
        p = int(frac * (length - 2))
        toks[1 : 1 + p] *= -1
        yield toks


def write_file(path: Path, docs) -> np.ndarray:
    """Write documents as JSON lines plus the meta, both atomically; return the meta."""
    rows, offset, lines = [], 0, []
    for toks in docs:
        line = encode_line(toks)
        rows.append((offset, len(toks)))
        lines.append(line)
        offset += len(line)
    with atomic_file(path) as f:
        f.writelines(lines)
    meta = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
    fmt.save_meta(meta, fmt.meta_path(path))
    return meta


def synth_dataset(
    out: str | Path, files: int, documents: int, seed: int = 0, mean_length: float = 562.0, vocab_size: int = 32000
) -> list[Path]:
    if files < 1 or documents < files:
        from tokentrain.errors import ConfigError

        raise ConfigError(
            f"data synth: need files >= 1 and documents >= files (got files={files}, documents={documents})"
        )
    if mean_length < 2 or vocab_size < 4:
        from tokentrain.errors import ConfigError

        raise ConfigError("data synth: need mean_length >= 2 and vocab_size >= 4 (ids 0-2 are reserved)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    per_file = [documents // files + (i < documents % files) for i in range(files)]
    width = max(3, len(str(files - 1)))
    paths = []
    for i, n in enumerate(per_file):
        rng = np.random.default_rng([seed, i])
        p = out / f"part-{i:0{width}d}.bin"
        write_file(p, synth_documents(rng, n, mean_length, vocab_size))
        paths.append(p)
    return paths
