"""The masks that keep documents in a pack apart, built from the batch's restarting
``position_ids``: the dense (B, 1, L, L) mask of the ``mask4d`` mode and flex_attention's
``BlockMask`` of the ``flex`` mode. One module for both so each follows the same rule: a query
attends to keys of its own document at or before it, and (a window W) fewer than W back."""

from __future__ import annotations

from typing import Any

import torch


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) document number of each token: a new document starts where positions restart."""
    start = torch.ones_like(position_ids, dtype=torch.bool)
    start[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return start.cumsum(-1)


def block_causal_mask(
    position_ids: torch.Tensor, additive_dtype: torch.dtype | None = None, window: int | None = None
) -> torch.Tensor | None:
    """(B, 1, L, L) causal mask that also blocks attention across documents, and (`window`)
    keys W or more tokens back (a query sees itself and the W - 1 before it, as in transformers).

    None when every row is a single document (plain causal: sdpa's fast `is_causal` path).
    Bool (True = attend) by default; additive (0 / finfo.min) in `additive_dtype` if given.
    """
    seg = segment_ids(position_ids)
    if bool((seg[:, -1] == 1).all()):
        return None
    L = position_ids.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=position_ids.device).tril_()
    if window:
        causal.triu_(1 - window)
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal
    allowed = allowed[:, None]
    if additive_dtype is None:
        return allowed
    neg = torch.finfo(additive_dtype).min
    return torch.zeros(allowed.shape, dtype=additive_dtype, device=allowed.device).masked_fill_(~allowed, neg)


def document_block_masks(position_ids: torch.Tensor, windows) -> dict[int | None, Any]:
    """One ``BlockMask`` per distinct window in `windows` (`attention.attention_windows` of the
    model: None, one window, or a dict by layer type) for a (B, L) micro-batch, keyed by the
    window (None: causal within each document)."""
    from torch.nn.attention.flex_attention import create_block_mask

    seg = segment_ids(position_ids)
    b, n = position_ids.shape
    wanted = set(windows.values()) if isinstance(windows, dict) else {windows or None}
    masks = {}
    for w in sorted(wanted, key=lambda x: -1 if x is None else x):
        masks[w] = create_block_mask(_mask_mod(seg, w), b, None, n, n, device=position_ids.device)
    return masks


def _mask_mod(seg: torch.Tensor, window: int | None):
    if window:

        def windowed(b, h, q, k):
            return (seg[b, q] == seg[b, k]) & (k <= q) & (q - k < window)

        return windowed

    def causal(b, h, q, k):
        return (seg[b, q] == seg[b, k]) & (k <= q)

    return causal
