"""Stand-ins for PyTorch's varlen kernel, one per release's exact signature, that compute the
reference result (per-document sdpa) on any device. `tokentrain.model.varlen` takes one in place
of torch's through ``TOKENTRAIN_VARLEN_KERNEL=tests.model.varlen_standins:NAME``, so the whole
varlen mode -- signature reading, causal flag, windows, GQA, scale -- runs in CPU tests and
through the CLI. Each call is appended to `CALLS`."""

from __future__ import annotations

import torch


class Calls(list):
    """The calls made, and which release's stand-in made them."""

    release = ""


CALLS = Calls()


def _reference(q, k, v, cu_q, cu_k, max_q, max_k, left: int, right: int, scale: float | None) -> torch.Tensor:
    """Attention within each document of `cu_q`: query i sees keys i - left .. i + right (-1: no limit)."""
    assert cu_k is cu_q or torch.equal(cu_k, cu_q)
    assert max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
    CALLS.append(
        {"cu": cu_q.tolist(), "max": max_q, "window": (left, right), "scale": scale, "heads": (q.shape[1], k.shape[1])}
    )
    out = torch.empty_like(q)
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        i = torch.arange(e - s, device=q.device)
        allowed = torch.ones(e - s, e - s, dtype=torch.bool, device=q.device)
        if left >= 0:
            allowed &= i[None, :] >= i[:, None] - left
        if right >= 0:
            allowed &= i[None, :] <= i[:, None] + right
        o = torch.nn.functional.scaled_dot_product_attention(
            *(t[s:e].transpose(0, 1)[None] for t in (q, k, v)),
            attn_mask=allowed,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        out[s:e] = o[0].transpose(0, 1)
    return out


def torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """torch 2.10: causal by flag, no window, no scale (1/sqrt(D))."""
    assert return_aux is None
    return _reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, -1, 0 if is_causal else -1, None)


def torch_2_11(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)
):
    """torch 2.11: bidirectional by default, causal is window_size=(-1, 0); GQA taken as it is."""
    assert return_aux is None
    return _reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size[0], window_size[1], scale)


def torch_2_12(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    return_aux=None,
    scale=None,
    window_size=(-1, -1),
    enable_gqa=False,
):
    """torch 2.12+: as 2.11, and differing head counts need enable_gqa=True."""
    if (query.shape[1] != key.shape[1]) and not enable_gqa:
        raise ValueError("varlen_attn: query and key have different numbers of heads; pass enable_gqa=True")
    return torch_2_11(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux=return_aux, scale=scale, window_size=window_size
    )


def bidirectional(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)
):
    """A broken kernel (2.11's signature) that ignores the window: every token sees its whole
    document. Documents stay apart and packed equals alone -- only causality is lost."""
    return _reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, -1, -1, scale)


def one_call(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    return_aux=None,
    scale=None,
    window_size=(-1, -1),
    enable_gqa=False,
):
    """torch 2.12's signature computed as the real kernel runs: one call over every document,
    nothing read back to the host (a block-diagonal mask from `cu_seq_q`, no loop over
    documents). What the host-sync count runs (tests/training/test_host_syncs.py); not recorded."""
    t = query.shape[0]
    i = torch.arange(t, device=query.device)
    doc = torch.searchsorted(cu_seq_q[1:].to(torch.int64), i, right=True)  # the document of each token
    allowed = doc[:, None] == doc[None, :]
    left, right = window_size
    if left >= 0:
        allowed &= i[None, :] >= i[:, None] - left
    if right >= 0:
        allowed &= i[None, :] <= i[:, None] + right
    o = torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(0, 1)[None] for x in (query, key, value)), attn_mask=allowed, scale=scale, enable_gqa=enable_gqa
    )
    return o[0].transpose(0, 1)
