"""PyTorch's own flash varlen kernel as a transformers attention function: exact document
isolation at flash speed on CUDA, with no extra package.

``torch.nn.attention.varlen.varlen_attn`` (CUDA only) takes the tokens of all documents back
to back, ``(T, H, D)``, and their boundaries ``cu_seq``: each document attends only to itself,
and no (L, L) mask is ever built. `varlen_attention` is registered with transformers'
``AttentionInterface`` as `VARLEN_IMPL`; a model loaded with ``attn_implementation=VARLEN_IMPL``
calls it in every attention layer with the keyword arguments the model was called with, so
`DocMasking` (mode ``varlen``) passes the batch's ``cu_seqlens`` through as ``cu_seq_lens_q/k``
-- the same names flash_attn uses.

The kernel's signature moved between releases, and a call that drops causality still isolates
documents (so only the causality probe would notice). `KernelCall` reads the installed signature
once and passes only what it takes:

* torch 2.10: ``(..., max_k, is_causal=False, return_aux=None)`` -- causal by ``is_causal``, no
  window (windowed layers refuse this mode, so ``auto`` moves on), no ``scale`` (q is pre-scaled);
* torch 2.11: ``(..., max_k, *, return_aux, scale, window_size=(-1, -1))`` -- **bidirectional by
  default**; causal is ``window_size=(-1, 0)``, a window W is ``(W - 1, 0)``; fewer KV heads taken
  as they are;
* torch 2.12+: adds ``enable_gqa=False`` (differing head counts raise without it).

The kernel has no soft-capping: layers that soft-cap their scores (gemma2) are computed
exactly, per document, by `_softcapped` -- right, but without the kernel's speed (logged once).

``TOKENTRAIN_VARLEN_KERNEL=module:function`` puts another function with one of these signatures
in place of torch's, on any device: the tests run the whole varlen mode on CPU through it with
stand-ins of each release's signature (tests/model/varlen_standins.py).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

VARLEN_IMPL = "tokentrain_varlen"
KERNEL_ENV = "TOKENTRAIN_VARLEN_KERNEL"


class WindowUnsupported(ValueError):
    """The installed kernel cannot apply a sliding window (torch 2.10)."""


@dataclass(frozen=True)
class KernelCall:
    """How to call one varlen kernel, read from its signature (never an unknown keyword)."""

    fn: Callable[..., Any]
    causal_by: str  # "window_size" | "is_causal"
    takes_scale: bool
    takes_gqa: bool

    @classmethod
    def of(cls, fn: Callable[..., Any]) -> KernelCall:
        params = inspect.signature(fn).parameters
        if "window_size" in params:
            causal_by = "window_size"
        elif "is_causal" in params:
            causal_by = "is_causal"
        else:
            raise TypeError(f"varlen kernel {fn!r}: its signature has neither window_size nor is_causal")
        return cls(fn, causal_by, "scale" in params, "enable_gqa" in params)

    @property
    def windows(self) -> bool:
        return self.causal_by == "window_size"

    def __call__(self, q, k, v, cu: torch.Tensor, max_len: int, scale: float | None, left: int) -> torch.Tensor:
        """Causal attention of (T, H, D) q/k/v within the documents `cu`; a query sees itself and
        the `left` keys before it (-1: all of its document's earlier keys)."""
        kw: dict[str, Any] = {}
        if self.causal_by == "window_size":
            kw["window_size"] = (left, 0)
        elif left >= 0:
            raise WindowUnsupported("this torch's varlen_attn has no window_size (sliding windows need torch >= 2.11)")
        else:
            kw["is_causal"] = True
        if self.takes_scale:
            kw["scale"] = scale
        elif scale is not None:  # the kernel uses 1/sqrt(D): fold the model's scale into q
            q = q * (scale * q.shape[-1] ** 0.5)
        if self.takes_gqa:
            kw["enable_gqa"] = q.shape[1] != k.shape[1]
        return self.fn(q, k, v, cu, cu, max_len, max_len, **kw)


def _find_kernel() -> tuple[KernelCall | None, bool]:
    """(the kernel, whether it is a stand-in that runs on any device)."""
    name = os.environ.get(KERNEL_ENV)
    if name:
        module, _, attr = name.partition(":")
        return KernelCall.of(getattr(importlib.import_module(module), attr)), True
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None, False
    return KernelCall.of(varlen_attn), False


KERNEL, STANDIN = _find_kernel()


def varlen_available(device: torch.device) -> bool:
    """Whether the kernel can run here: torch has it, on a CUDA GPU of compute capability >= 8
    (a `KERNEL_ENV` stand-in: anywhere)."""
    if KERNEL is None:
        return False
    if STANDIN:
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


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
    left = sliding_window - 1 if sliding_window else -1
    if softcap:
        out = _softcapped(q, k, v, cu_seq_lens_q, scaling, left, softcap)
    else:
        if q.is_cuda and q.dtype == torch.float32:  # the kernel takes half precision only
            dt = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
            q, k, v = q.to(dt), k.to(dt), v.to(dt)
        assert KERNEL is not None, "chosen only when varlen_available()"
        out = KERNEL(q, k, v, cu_seq_lens_q, max_length_q, scaling, left)
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
