"""The one contract the data layer hands to the model and the engine: a `Batch`.

    input_ids     (B, L) int64   abs(token)
    labels        (B, L) int64   target of each position, already shifted; -100 = none
    position_ids  (B, L) int64   restart at 0 at each document (fragment) start
    cu_seqlens    (B, K) int32   per row, fragment boundaries 0..L, right-padded by repeating L

Rows of different lengths (unpacked mode) are padded to the longest: padding is its own
trailing segment (labels -100), which causal attention never lets real tokens see, so no
attention mask is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tokentrain.data.format import IGNORE_INDEX

if TYPE_CHECKING:  # torch is imported lazily: the CLI starts without it
    import torch

PAD_ID = 0


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    indices: list[int]
    # Real (non-padding) tokens per mixture source, from the samples' "source"; None for one dataset.
    source_tokens: dict[str, int] | None = None

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device) -> Batch:
        return Batch(
            self.input_ids.to(device, non_blocking=True),
            self.labels.to(device, non_blocking=True),
            self.position_ids.to(device, non_blocking=True),
            self.cu_seqlens.to(device, non_blocking=True),
            self.indices,
            self.source_tokens,
        )


def collate(samples: list[dict]) -> Batch:
    import torch

    width = max(len(s["input_ids"]) for s in samples)
    segs = max(len(s["cu_seqlens"]) for s in samples) + 1  # +1: room for a padding segment
    b = len(samples)
    ids = np.full((b, width), PAD_ID, dtype=np.int64)
    labels = np.full((b, width), IGNORE_INDEX, dtype=np.int64)
    pos = np.zeros((b, width), dtype=np.int64)
    cu = np.full((b, segs), width, dtype=np.int32)
    for r, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[r, :n], labels[r, :n], pos[r, :n] = s["input_ids"], s["labels"], s["position_ids"]
        pos[r, n:] = np.arange(width - n)
        cu[r, : len(s["cu_seqlens"])] = s["cu_seqlens"]
    # Drop the padding column when no row needed it.
    if (cu[:, -2] == width).all():
        cu = cu[:, :-1]
    per_source: dict[str, int] | None = None
    if "source" in samples[0]:
        per_source = {}
        for s in samples:
            per_source[s["source"]] = per_source.get(s["source"], 0) + len(s["input_ids"])
    return Batch(
        torch.from_numpy(ids),
        torch.from_numpy(labels),
        torch.from_numpy(pos),
        torch.from_numpy(cu),
        [int(s["index"]) for s in samples],
        per_source,
    )
