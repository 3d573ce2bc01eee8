"""Naming the samples of a step (file:line) for errors: token ids out of the vocabulary, a
non-finite loss."""

from __future__ import annotations

import torch

from tokentrain.errors import DataError


def describe_samples(dataset, micro: list, limit: int = 8) -> str:
    """'sample K (file:line, ...)' for the samples of a step's micro-batches, on one line."""
    parts = []
    ks = [k for m in micro for k in m.batch.indices]
    for k in ks[:limit]:
        try:
            src = dataset.sources(k)
        except Exception:  # a message must not fail
            src = []
        where = ", ".join(f"{f}:{line}" for f, line in src[:4]) + (f", +{len(src) - 4} more" if len(src) > 4 else "")
        parts.append(f"sample {k} ({where})")
    return "; ".join(parts) + (f"; +{len(ks) - limit} more samples" if len(ks) > limit else "")


def check_token_ids(batch, vocab_size: int, dataset) -> None:
    """Token ids must be < the model's vocabulary size (else the embedding fails, or worse)."""
    if batch.max_token < vocab_size:  # counted on the host by collate
        return
    for row, k in enumerate(batch.indices):
        ids, labels = batch.input_ids[row], batch.labels[row]
        bad = torch.nonzero((ids >= vocab_size) | (labels >= vocab_size))
        if not len(bad):
            continue
        pos = int(bad[0])
        token = int(max(ids[pos], labels[pos]))
        src = dataset.sources(k)
        cu = [int(c) for c in batch.cu_seqlens[row]]
        # the document (fragment) holding the position; a label is its own document's next token
        frag = sum(1 for c in cu[1:] if c <= pos)
        where = f"{src[frag][0]}:{src[frag][1]}" if frag < len(src) else ", ".join(f"{f}:{line}" for f, line in src)
        raise DataError(
            f"{where}: token id {token} >= the model's vocabulary size {vocab_size} "
            f"(sample {k}); fix the data or use the tokenizer it was made with"
        )
