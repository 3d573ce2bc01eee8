"""What json.dumps-style lines (``", "``) cost the parser, one list alone: numpy's reading of
the compact and the spaced text of the same values, the ``", "`` count that proves the spaced
reading (data/fastjson.py), and compacting with ``bytes.replace`` first (the dropped way).

    .venv/bin/python bench/spaced_parse.py [--tokens 9700] [--rounds 5] [--calls 300]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def best_us(fn, rounds: int, calls: int) -> float:
    """Best of `rounds` CPU-time means over `calls` calls (the shared machine is noisy)."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time() - t0) / calls)
    return best * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=9700, help="a random pack parses ~9,700 tokens for 8,192")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=300)
    a = ap.parse_args()
    vals = np.random.default_rng(0).integers(1, 60000, a.tokens)
    compact = ",".join(map(str, vals)).encode()
    spaced = ", ".join(map(str, vals)).encode()
    pair = int(np.frombuffer(b", ", dtype=np.uint16)[0])
    m = len(spaced)

    def count_pairs() -> int:
        even = np.frombuffer(spaced, dtype=np.uint16, count=m // 2)
        odd = np.frombuffer(spaced, dtype=np.uint16, offset=1, count=(m - 1) // 2)
        return int(np.count_nonzero(even == pair)) + int(np.count_nonzero(odd == pair))

    assert count_pairs() == a.tokens - 1
    cases = {
        "np.fromstring, compact": lambda: np.fromstring(compact, dtype=np.int64, sep=","),
        "np.fromstring, spaced": lambda: np.fromstring(spaced, dtype=np.int64, sep=","),
        '", " count (uint16 views)': count_pairs,
        'bytes.replace(", ", ",")': lambda: spaced.replace(b", ", b","),
    }
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"one list of {a.tokens} values 1-60000: compact {len(compact)} bytes, spaced {m}")
    got = {k: best_us(f, a.rounds, a.calls) for k, f in cases.items()}
    base = got["np.fromstring, compact"]
    for k, us in got.items():
        print(f"  {k:28s} {us:8.1f} us CPU  ({us / base:.2f} of compact parsing)")
    spaced_cost = got["np.fromstring, spaced"] + got['", " count (uint16 views)']
    print(f"spaced path / compact path: x{base / spaced_cost:.2f} speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
