"""What the resume fingerprint of a dataset costs: the first start after a file is written
(every byte hashed, data/digest.py) and every later start (digests from the cache).

    .venv/bin/python bench/fingerprint.py [--gb 1.0] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def write_corpus(folder: Path, gb: float) -> Path:
    """One .bin of ~`gb` GB (the same 1 MiB of lines repeated: hashing does not care) and its meta."""
    from tokentrain.data.index import ensure_meta

    line = b'{"tokens": [' + b", ".join(str(1000 + i % 30000).encode() for i in range(500)) + b"]}\n"
    block = line * ((1 << 20) // len(line))
    p = folder / "part-000.bin"
    with open(p, "wb") as f:
        for _ in range(int(gb * 1e9) // len(block)):
            f.write(block)
    ensure_meta(p)
    return p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        os.environ["TOKENTRAIN_CACHE"] = str(Path(tmp) / "cache")
        from tokentrain.checkpoint.fingerprint import dataset_fingerprint

        data = Path(tmp) / "data"
        data.mkdir()
        size = write_corpus(data, args.gb).stat().st_size
        for what in ("first start (hashed)", "later start (cached)"):
            t0 = time.perf_counter()
            dataset_fingerprint(str(data), ".bin", None)
            took = time.perf_counter() - t0
            print(f"{what}: {size / 1e9:.2f} GB in {took:.3f}s ({size / 1e9 / took:.2f} GB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
