"""Several corpora, one sample stream: a deterministic, weighted, pack-level interleave.

Why pack-level: each source is packed on its own, exactly as a single ``dataset_folder``
would be, and the mixture only chooses, slot by slot, which source the next pack comes
from. A pack never mixes sources, so the document isolation inside a pack (position_ids,
cu_seqlens) is untouched, and a source's share of packs is, in cut mode, exactly its share
of tokens (every pack holds ``max_length`` tokens). A document-level interleave would have
to re-pack the mixed document stream: where pack k starts would depend on every earlier
choice, and random access (exact resume, any split of ranks) would need a table of the
whole planned stream.

The order. Weights are normalised and rounded to integer quotas out of ``PERIOD`` slots
(largest remainder). In every period source s gets exactly q_s slots, spread evenly: its
j-th slot sits at time (j + u_s) / q_s, with a phase u_s drawn from (seed, period), and the
period is these times sorted. So every prefix of the stream holds each source's share to
within about one pack (plus the rounding of a weight to 1/PERIOD), whatever the seed;
the seed decides which source leads and, with ``shuffle``, the order within a source.

Within a source, its k-th pack is pack ``perm_e[k mod n]`` of source epoch e = k // n, a
fresh permutation from (seed, source, e) -- an over-sampled source (epochs > 1) repeats
its packs in a new order; an under-sampled one is never read to its end.

Random access: position i needs only its period (cached). The stream at a position does not
depend on who reads it, which makes it split-invariant across ranks x micro-batches x
accumulation and exactly resumable from the sampler's position (see ``StreamSampler``).
Mixture positions are unbounded: one *mixture epoch* is as many packs as all sources hold.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

PERIOD = 10_000  # slots per period; a weight is rounded to 1/PERIOD of the total


@dataclass(frozen=True)
class Source:
    folder: str
    weight: float
    name: str


def parse_sources(entries, where: str = "datasets") -> list[Source]:
    """Validate ``datasets = [dict(folder=..., weight=..., name=...), ...]``: ValueError with
    the entry and the key at fault. Names default to the folder's last component."""
    from pathlib import PurePath

    if not isinstance(entries, (list, tuple)) or not entries:
        raise ValueError(f"{where}: expected a non-empty list of dict(folder=..., weight=...)")
    out, names = [], set()
    for i, e in enumerate(entries):
        at = f"{where}[{i}]"
        if not isinstance(e, dict):
            raise ValueError(f"{at} = {e!r}: expected dict(folder=..., weight=...)")
        unknown = set(e) - {"folder", "weight", "name"}
        if unknown:
            raise ValueError(f"{at}: unknown key {sorted(unknown)[0]!r} (keys: folder, weight, name)")
        folder = e.get("folder")
        if not isinstance(folder, str) or not folder:
            raise ValueError(f"{at}: 'folder' must be a non-empty string")
        weight = _weight(e.get("weight", 1.0), at)
        name = e.get("name") or PurePath(folder.rstrip("/")).name or f"source{i}"
        if not isinstance(name, str):
            raise ValueError(f"{at}: 'name' must be a string")
        if name in names:
            raise ValueError(f"{at}: name {name!r} used twice; give each source its own 'name'")
        names.add(name)
        out.append(Source(folder, weight, name))
    quotas(np.array([s.weight for s in out]))  # weights too small to get a slot: said now
    return out


def _weight(value, at: str) -> float:
    """A finite number > 0 that fits a float: inf, NaN or 10**400 would make every share NaN or 0."""
    try:
        w = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:
        w = math.inf
    if not (math.isfinite(w) and w > 0):
        shown = repr(value) if len(repr(value)) <= 24 else repr(value)[:20] + "..."
        raise ValueError(f"{at}: 'weight' = {shown}: must be a finite number > 0 (a relative share)")
    return w


def quotas(weights: np.ndarray) -> np.ndarray:
    """Integer slots per period for each weight (largest remainder), each >= 1."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.max()  # two weights near the float maximum would sum to inf
    share = w / w.sum() * PERIOD
    q = np.floor(share).astype(np.int64)
    rest = PERIOD - int(q.sum())
    q[np.argsort(-(share - q), kind="stable")[:rest]] += 1
    if (q == 0).any():
        raise ValueError(f"a weight below 1/{PERIOD} of the total gets no sample; raise it or drop the source")
    return q


class MixtureDataset:
    """The weighted interleave of per-source datasets (each a PackedDataset or UnpackedDataset).

    A sample is the source's sample with ``index`` set to the mixture position and ``source``
    to the source's name (the batch sums real tokens per source from it)."""

    def __init__(self, datasets: list, names: list[str], weights, seed: int = 0, shuffle: bool = True):
        if len(datasets) != len(names) or len(datasets) != len(weights):
            raise ValueError("one name and one weight per dataset")
        self.datasets, self.names = list(datasets), list(names)
        self.sizes = np.array([len(d) for d in datasets], dtype=np.int64)
        self.quota = quotas(np.asarray(weights, dtype=np.float64))
        self.weights = self.quota / PERIOD  # the shares really used
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self._period = functools.lru_cache(maxsize=4)(self._build_period)
        self._perm = functools.lru_cache(maxsize=16)(self._build_perm)

    def __getstate__(self) -> dict:  # DataLoader workers under spawn: the caches are rebuilt there
        state = self.__dict__.copy()
        del state["_period"], state["_perm"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._period = functools.lru_cache(maxsize=4)(self._build_period)
        self._perm = functools.lru_cache(maxsize=16)(self._build_perm)

    def __len__(self) -> int:
        """One mixture epoch: as many samples as all sources hold."""
        return int(self.sizes.sum())

    # ------------------------------------------------------------ the order
    def _build_period(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each slot, rank of the slot among its source's slots) for period p."""
        phases = np.random.default_rng([self.seed, 0x6D6978, p]).random(len(self.quota))
        times = np.concatenate([(np.arange(q) + u) / q for q, u in zip(self.quota, phases)])
        src = np.repeat(np.arange(len(self.quota)), self.quota)
        rank = np.concatenate([np.arange(q) for q in self.quota])
        order = np.argsort(times, kind="stable")  # ties: the lower source first
        return src[order], rank[order]

    def _build_perm(self, s: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 0x6D6978, s, epoch]).permutation(int(self.sizes[s]))

    def locate(self, i: int) -> tuple[int, int]:
        """Mixture position i -> (source, the source's sample number)."""
        if i < 0:
            raise IndexError(f"mixture position {i} < 0")
        p, o = divmod(int(i), PERIOD)
        src, rank = self._period(p)
        s = int(src[o])
        k = p * int(self.quota[s]) + int(rank[o])  # how many of s's samples came before
        epoch, local = divmod(k, int(self.sizes[s]))
        return s, int(self._perm(s, epoch)[local]) if self.shuffle else local

    def counts_before(self, n: int) -> np.ndarray:
        """Samples drawn from each source in positions [0, n)."""
        p, o = divmod(int(n), PERIOD)
        c = self.quota * p
        if o:
            src, _ = self._period(p)
            c = c + np.bincount(src[:o], minlength=len(self.quota))
        return c

    # ------------------------------------------------------------ dataset protocol
    def __getitem__(self, i: int) -> dict:
        s, k = self.locate(i)
        sample = self.datasets[s][k]
        sample["index"] = int(i)
        sample["source"] = self.names[s]
        return sample

    def sources(self, i: int) -> list[tuple[str, int]]:
        """(file, 1-based line) of every document position i draws from."""
        s, k = self.locate(i)
        return self.datasets[s].sources(k)

    def describe(self, counts) -> list[dict]:
        """Per source: name, weight used, samples, planned samples (``counts``) and effective epochs."""
        return [
            {
                "name": name,
                "weight": float(w),
                "samples": int(n),
                "planned_samples": int(c),
                "epochs": float(c / n),
            }
            for name, w, n, c in zip(self.names, self.weights, self.sizes, counts)
        ]
