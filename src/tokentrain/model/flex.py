"""PyTorch's flex_attention with a document ``BlockMask`` as a transformers attention function:
exact document isolation, sliding windows and soft-capping, fused on CUDA, with no extra package.

Why a second GPU mode next to `tokentrain.model.varlen`: the varlen kernel cannot soft-cap
scores, so gemma2 there runs per document without a fused kernel; flex applies the cap as a
``score_mod`` inside the fused kernel, and skips the blocks the mask rules out (other
documents, keys beyond the window), so its cost grows with the documents, not the pack.

`DocMasking` (mode ``flex``) builds one ``BlockMask`` per distinct sliding window of the model
for each micro-batch (documents from the restarting ``position_ids``, causal, and the window:
a query sees itself and the W - 1 keys before it, as transformers' masks do) and passes them
as ``flex_block_masks``; each layer picks the one of its own window. On CUDA the kernel is
``torch.compile``d (once; the first steps pay the compile). CUDA only for training: flex has
no backward on CPU (there it runs unfused, forward only -- what the CPU tests read).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch

FLEX_IMPL = "tokentrain_flex"
FLEX_MASKS = "flex_block_masks"  # the keyword the masks travel under, model -> layers -> `flex_attention_fn`


def _find_flex() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:  # torch < 2.5
        return None
    return flex_attention, create_block_mask


_FLEX = _find_flex()
_TAKES_GQA = _FLEX is not None and "enable_gqa" in inspect.signature(_FLEX[0]).parameters


def flex_available() -> bool:
    """Whether this torch has flex_attention (training with it needs CUDA: no backward elsewhere)."""
    return _FLEX is not None


_compiled: Callable[..., Any] | None = None


def _kernel(device: torch.device) -> Callable[..., Any]:
    """flex_attention compiled on CUDA (once, static shapes: packed rows all have one length, and
    a dynamic-shape graph is one more thing that differs from the reference); elsewhere
    unfused, forward only (flex has no backward on CPU, so training there never chooses it)."""
    global _compiled
    assert _FLEX is not None, "chosen only when flex_available()"
    if device.type == "cuda":
        if _compiled is None:
            _compiled = torch.compile(_FLEX[0], dynamic=False)
        return _compiled
    return _unfused


def _unfused(*args, **kwargs):
    assert _FLEX is not None
    with warnings.catch_warnings():  # "called without torch.compile()": known, off CUDA
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return _FLEX[0](*args, **kwargs)


def flex_attention_fn(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query (B, Hq, L, D), key/value (B, Hkv, L, D)
    -> ((B, L, Hq, D), None). Needs the micro-batch's block masks (``flex_block_masks``)."""
    masks = kwargs.get(FLEX_MASKS)
    if masks is None:
        raise ValueError(f"attn_implementation={FLEX_IMPL!r} needs {FLEX_MASKS} (doc_masking = 'flex')")
    if dropout:
        raise ValueError(f"attn_implementation={FLEX_IMPL!r} has no attention dropout; set attention_dropout = 0")
    window = sliding_window or None
    if window not in masks:
        raise ValueError(f"no flex block mask for sliding window {window} (masks were built for {sorted(masks)})")
    score_mod = None
    if softcap:
        cap = float(softcap)

        def score_mod(score, b, h, q, k):
            return torch.tanh(score / cap) * cap

    block_mask = masks[window]
    _check_mask_fits(block_mask, query)
    query, key, value = _compute_dtype(query, key, value)
    kw: dict[str, Any] = {}
    if query.shape[1] != key.shape[1]:
        if _TAKES_GQA:
            kw["enable_gqa"] = True
        else:  # torch < 2.6: repeat the kv heads
            rep = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    out = _kernel(query.device)(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling, **kw)
    return out.transpose(1, 2).contiguous(), None


def _check_mask_fits(block_mask, query: torch.Tensor) -> None:
    """The fused kernel trusts the mask's block tables: one built for another batch, length or
    device would be read silently (the unfused CPU path re-evaluates mask_mod and hides it)."""
    b, _, n, _ = query.shape
    shape = tuple(block_mask.shape)
    if shape[0] != b or shape[-2:] != (n, n) or block_mask.kv_num_blocks.device != query.device:
        raise ValueError(
            f"flex block mask built for {shape} on {block_mask.kv_num_blocks.device}, "
            f"used for a batch of {b} x {n} on {query.device}"
        )


def _compute_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """One dtype for q, k and v, the compute dtype: under autocast on CUDA the rotary embedding
    promotes q and k to fp32 while v stays bf16, and the compiled kernel does not autocast."""
    dt = q.dtype
    if q.is_cuda and torch.is_autocast_enabled("cuda"):
        dt = torch.get_autocast_dtype("cuda")
    return q.to(dt), k.to(dt), v.to(dt)


def register() -> None:
    """Make `FLEX_IMPL` a valid ``attn_implementation`` (idempotent). No mask function is
    registered on purpose: transformers then builds no mask; ours come as `FLEX_MASKS`."""
    from transformers import AttentionInterface

    AttentionInterface.register(FLEX_IMPL, flex_attention_fn)


register()
