"""Token-summed cross-entropy, computed in chunks so full fp32 logits never exist.

The model is called without labels (it would shift them again: ours are already
aligned by the data layer) and the loss is the *sum* over target tokens in fp32; the
engine divides by the number of target tokens of the whole optimizer step.

`linear_cross_entropy_sum` fuses the output projection with the loss: only the hidden
states of target positions are kept, and for each chunk of them the logits are formed,
the loss and both gradients (hidden, weight) computed at once, and the logits dropped.
Peak extra memory is one chunk of logits instead of (tokens x vocab) fp32 -- e.g. 2.4 GB
for a 4096-token pack at a 150k vocabulary. Same number of matmuls as the unfused path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 25  # logits per chunk (128 MB in fp32)


def auto_chunk_tokens(vocab_size: int, requested: int = 0) -> int:
    return requested if requested > 0 else max(128, CHUNK_ELEMENTS // max(1, vocab_size))


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_i CE(h_i @ W^T + b, y_i) with the gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, compute_dtype):
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if bias is not None else None
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            h = hidden[s : s + chunk].to(compute_dtype)
            y = targets[s : s + chunk]
            logits = F.linear(h, w, b).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None])[:, 0]).sum()
            # d/dlogits of sum CE = softmax - onehot
            g = logits.sub_(lse[:, None]).exp_()
            g[torch.arange(len(y), device=y.device), y] -= 1.0
            gc = g.to(compute_dtype)
            grad_h[s : s + chunk] = (gc @ w).to(hidden.dtype)
            grad_w += (gc.t() @ h).float()
            if grad_b is not None:
                grad_b += g.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b if grad_b is not None else torch.empty(0))
        ctx.has_bias = bias is not None
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype)
        gw = (grad_w * grad_out).to(ctx.weight_dtype)
        gb = (grad_b * grad_out).to(ctx.weight_dtype) if ctx.has_bias else None
        return gh, gw, gb, None, None, None


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_tokens: int = 0,
    compute_dtype: torch.dtype | None = None,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed CE of `hidden` (..., H) projected by `weight` (V, H) against `labels` (...).

    Positions with label -100 cost nothing. Returns a fp32 scalar that is 0 (still
    connected to the graph, so every parameter gets a zero gradient) when there are no targets.
    `targets`: the flat positions of the targets when known (`Batch.targets`, found on the host);
    else found here, which on a GPU waits for it (their number sizes what follows).
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    keep = target_positions(y, targets)
    h, y = h.index_select(0, keep), y.index_select(0, keep)
    if compute_dtype is None:
        compute_dtype = (
            torch.get_autocast_dtype(hidden.device.type)
            if torch.is_autocast_enabled(hidden.device.type)
            else weight.dtype
        )
    chunk = auto_chunk_tokens(weight.shape[0], chunk_tokens)
    with torch.autocast(hidden.device.type, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _LinearCrossEntropySum.apply(h, weight, bias, y, chunk, compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        for s in range(0, len(y), chunk):  # evaluation: the loss only
            logits = F.linear(h[s : s + chunk].to(compute_dtype), w, b).float()
            total += F.cross_entropy(logits, y[s : s + chunk], reduction="sum")
        return total


def target_positions(flat_labels: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """The positions of `flat_labels` that are targets: `targets` when given, else searched."""
    return targets if targets is not None else (flat_labels != IGNORE_INDEX).nonzero()[:, 0]


def logits_cross_entropy_sum(
    logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 0, targets: torch.Tensor | None = None
) -> torch.Tensor:
    """Summed CE from already computed logits, upcast to fp32 one chunk at a time."""
    x = logits.reshape(-1, logits.shape[-1])
    y = labels.reshape(-1)
    keep = target_positions(y, targets)
    x, y = x.index_select(0, keep), y.index_select(0, keep)
    chunk = auto_chunk_tokens(x.shape[-1], chunk_tokens)
    total = x.new_zeros((), dtype=torch.float32) + 0.0 * x.sum()  # stay on the graph with no targets
    for s in range(0, len(y), chunk):
        total = total + F.cross_entropy(x[s : s + chunk].float(), y[s : s + chunk], reduction="sum")
    return total
