"""PyTorch's own flash varlen kernel as a transformers attention function: exact document
isolation at flash speed on CUDA, with no extra package.

``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.9, CUDA only) takes the tokens of
all documents back to back, ``(T, H, D)``, and their boundaries ``cu_seq``: each document
attends only to itself, and no (L, L) mask is ever built. `varlen_attention` is registered
with transformers' ``AttentionInterface`` as `VARLEN_IMPL`; a model loaded with
``attn_implementation=VARLEN_IMPL`` calls it in every attention layer with the keyword
arguments the model was called with, so `DocMasking` (mode ``varlen``) passes the batch's
``cu_seqlens`` through as ``cu_seq_lens_q/k`` -- the same names flash_attn uses.

Per layer it honours the softmax scale, grouped-query heads (``enable_gqa``) and the
layer's sliding window (``window_size=(W - 1, 0)``: a query sees itself and the W - 1
keys before it, as transformers' masks do). The kernel has no soft-capping: layers that
soft-cap their scores (gemma2) are computed exactly, per document, by `_softcapped` --
right, but without the kernel's speed (logged once).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

VARLEN_IMPL = "tokentrain_varlen"


def _find_kernel() -> Callable[..., Any] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.9
        return None
    return varlen_attn


varlen_attn = _find_kernel()


def varlen_available(device: torch.device) -> bool:
    """Whether the kernel can run here: torch has it, on a CUDA GPU of compute capability >= 8."""
    if varlen_attn is None or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def flat_cu_seqlens(cu_seqlens: torch.Tensor, row_length: int) -> tuple[torch.Tensor, int]:
    """The batch contract's per-row boundaries (B, K) as one row's (all rows back to back, B*L
    tokens): int32 boundaries 0..B*L, and the longest document."""
    b = cu_seqlens.shape[0]
    offs = torch.arange(b, device=cu_seqlens.device, dtype=torch.int64)[:, None] * row_length
    flat = torch.unique_consecutive((cu_seqlens.to(torch.int64) + offs).reshape(-1))
    return flat.to(torch.int32), int((flat[1:] - flat[:-1]).max())


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query (1, Hq, T, D), key/value (1, Hkv, T, D)
    -> ((1, T, Hq, D), None). Needs the document boundaries (``cu_seq_lens_q``)."""
    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise ValueError(
            f"attn_implementation={VARLEN_IMPL!r} needs one flattened row and cu_seq_lens_q (doc_masking = 'varlen')"
        )
    if dropout:
        raise ValueError(f"attn_implementation={VARLEN_IMPL!r} has no attention dropout; set attention_dropout = 0")
    if max_length_q is None:
        max_length_q = int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # (T, H, D)
    window = (sliding_window - 1, 0) if sliding_window else (-1, 0)  # (-1, 0): causal
    if softcap:
        out = _softcapped(q, k, v, cu_seq_lens_q, scaling, window[0], softcap)
    else:
        if q.is_cuda and q.dtype == torch.float32:  # the kernel takes half precision only
            dt = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
            q, k, v = q.to(dt), k.to(dt), v.to(dt)
        assert varlen_attn is not None, "chosen only when varlen_available()"
        out = varlen_attn(
            q,
            k,
            v,
            cu_seq_lens_q,
            cu_seq_lens_q,
            max_length_q,
            max_length_q,
            scale=scaling,
            window_size=window,
            enable_gqa=q.shape[1] != k.shape[1],
        )
    return out[None], None


_warned_softcap = False


def _softcapped(q, k, v, cu: torch.Tensor, scale: float | None, left: int, cap: float) -> torch.Tensor:
    """Exact attention with ``cap * tanh(scores / cap)``, one document at a time (the kernel
    cannot soft-cap): scores in fp32, causal, window of `left` + 1 keys (-1: none)."""
    global _warned_softcap
    if not _warned_softcap:
        _warned_softcap = True
        log.info("varlen attention: soft-capped layers are computed per document without the flash kernel")
    hq, hk, d = q.shape[1], k.shape[1], q.shape[2]
    scale = d**-0.5 if scale is None else scale
    out = torch.empty(q.shape[0], hq, v.shape[2], dtype=v.dtype, device=v.device)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if e == s:
            continue
        qd = q[s:e].transpose(0, 1).float()  # (Hq, n, D)
        kd = k[s:e].transpose(0, 1).float().repeat_interleave(hq // hk, 0)
        vd = v[s:e].transpose(0, 1).float().repeat_interleave(hq // hk, 0)
        scores = (qd @ kd.transpose(1, 2)) * scale
        scores = torch.tanh(scores / cap) * cap
        i = torch.arange(e - s, device=q.device)
        allowed = i[None, :] <= i[:, None]
        if left >= 0:
            allowed &= i[None, :] >= i[:, None] - left
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[s:e] = (scores.softmax(-1) @ vd).transpose(0, 1).to(v.dtype)
    return out


def register() -> None:
    """Make `VARLEN_IMPL` a valid ``attn_implementation`` (idempotent). No mask function is
    registered on purpose: transformers then builds no mask for it."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_IMPL, varlen_attention)


register()
