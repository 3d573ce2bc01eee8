"""The one contract the data layer hands to the model and the engine: a `Batch`.

    input_ids     (B, L) int64   abs(token)
    labels        (B, L) int64   target of each position, already shifted; -100 = none
    position_ids  (B, L) int64   restart at 0 at each document (fragment) start
    cu_seqlens    (B, K) int32   per row, fragment boundaries 0..L, right-padded by repeating L

Rows of different lengths (unpacked mode) are padded to the longest: padding is its own
trailing segment (labels -100), which causal attention never lets real tokens see, so no
attention mask is needed.

What the step needs to know about the batch is counted here, on the host (in the DataLoader's
workers), never read back from the device: the target count, the largest token id, the flat
positions of the targets (the loss gathers them without ``nonzero``) and every row's document
boundaries back to back with the longest document (the varlen kernel's ``cu_seq_lens`` and
``max_length``, without ``unique``/``max`` on the device). Each such read on a GPU tensor
would stall the host until the GPU caught up, once per micro-batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
    num_targets: int  # labels != -100
    max_token: int  # the largest id in input_ids and labels
    targets: torch.Tensor  # (N,) int64: flat positions (row * L + column) of the N targets
    doc_bounds: torch.Tensor  # (D + 1,) int32: all rows' documents back to back over B * L tokens
    max_doc: int  # the longest of those documents
    # Real (non-padding) tokens per mixture source, from the samples' "source"; None for one dataset.
    source_tokens: dict[str, int] | None = None

    def to(self, device) -> Batch:
        """On `device`, copied asynchronously (from pinned memory on CUDA: the host runs on)."""
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> Batch:
        """Page-locked copies (what the DataLoader calls with pin_memory=True), so that `to` is
        an asynchronous copy."""
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        changes: dict[str, Any] = {f: fn(getattr(self, f)) for f in TENSOR_FIELDS}
        return dataclasses.replace(self, **changes)


TENSOR_FIELDS = ("input_ids", "labels", "position_ids", "cu_seqlens", "targets", "doc_bounds")


def doc_bounds(cu: np.ndarray, width: int) -> tuple[np.ndarray, int]:
    """(B, K) per-row boundaries -> every row's documents back to back over B * width tokens:
    int32 boundaries, and the longest document."""
    offs = np.arange(cu.shape[0], dtype=np.int64)[:, None] * width
    flat = cu.astype(np.int64) + offs
    flat = flat.reshape(-1)
    flat = flat[np.concatenate(([True], flat[1:] != flat[:-1]))]
    return flat.astype(np.int32), int(np.diff(flat).max(initial=0))


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
    is_target = labels != IGNORE_INDEX
    bounds, longest = doc_bounds(cu, width)
    return Batch(
        torch.from_numpy(ids),
        torch.from_numpy(labels),
        torch.from_numpy(pos),
        torch.from_numpy(cu),
        [int(s["index"]) for s in samples],
        num_targets=int(is_target.sum()),
        max_token=int(max(ids.max(), labels.max())),
        targets=torch.from_numpy(np.flatnonzero(is_target).astype(np.int64)),
        doc_bounds=torch.from_numpy(bounds),
        max_doc=longest,
        source_tokens=per_source,
    )
