"""Mixture overhead: reading packs through a `datasets` mixture against the same sources read alone.

Three `tokentrain data synth` sources (weights 0.6/0.3/0.1) packed at --max-length; packs are
read in stream order through `MixtureDataset` and, as the baseline, the same (source, pack)
pairs straight from the per-source `PackedDataset`s. Reports CPU microseconds per pack for
both (median of rounds) and the mixture's own cost: locating a position (period build
amortised, ``locate`` only).

    .venv/bin/python bench/mixture_overhead.py [--packs N] [--max-length L] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--packs", type=int, default=20000)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "tokentrain-bench-mix"))
    args = ap.parse_args()

    from tokentrain.config.schema import TrainConfig
    from tokentrain.data.dataset import build_mixture
    from tokentrain.data.synth import synth_dataset

    root = Path(args.workdir)
    weights = {"web": 0.6, "code": 0.3, "books": 0.1}
    for i, name in enumerate(weights):
        if not (root / name).is_dir():
            synth_dataset(root / name, files=2, documents=20000, seed=i, mean_length=562, vocab_size=32000)
    cfg = TrainConfig(
        datasets=[dict(folder=str(root / n), weight=w, name=n) for n, w in weights.items()],
        max_length=args.max_length,
    )
    mix = build_mixture(cfg)
    n = args.packs
    pairs = [mix.locate(i) for i in range(n)]

    def cpu(fn) -> float:
        t = time.process_time()
        fn()
        return (time.process_time() - t) / n * 1e6

    mixed, alone, locate = [], [], []
    for _ in range(args.rounds):
        mixed.append(cpu(lambda: [mix[i] for i in range(n)]))
        alone.append(cpu(lambda: [mix.datasets[s][k] for s, k in pairs]))
        mix._period.cache_clear()
        mix._perm.cache_clear()
        locate.append(cpu(lambda: [mix.locate(i) for i in range(n)]))
    m, a, lo = (statistics.median(x) for x in (mixed, alone, locate))
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"sources: {', '.join(f'{k} {len(d)} packs' for k, d in zip(mix.names, mix.datasets))}; {n} packs read")
    print(f"mixture read: {m:.1f} us CPU/pack; sources alone: {a:.1f} us CPU/pack; overhead {m - a:+.1f} us "
          f"({100 * (m - a) / a:+.1f} %); locate alone (caches cold each round): {lo:.2f} us/pack")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
