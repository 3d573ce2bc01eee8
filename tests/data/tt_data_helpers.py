"""Independent helpers for the data-layer tests: they write InternLM-format files and
compute what the data layer should produce, without using tokentrain's own code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

IGNORE = -100


def line_bytes(tokens, newline: bytes = b"\n", spaced: bool = True) -> bytes:
    sep = ", " if spaced else ","
    return ('{"tokens": [' + sep.join(str(int(t)) for t in tokens) + "]}").encode() + newline


def write_bin(
    path, docs, *, meta=True, newline=b"\n", final_newline=True, meta_dtype=np.int64, extra_cols=0, raw_lines=None
) -> np.ndarray:
    """Write `docs` (lists of ints) as a data file; with `meta`, also X.bin.meta computed
    here by hand. `raw_lines` (bytes, each without newline) overrides the docs' lines.
    Returns the (N, 2) meta (offset, count) of the non-blank lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = raw_lines if raw_lines is not None else [line_bytes(d, b"") for d in docs]
    buf, rows = bytearray(), []
    for i, ln in enumerate(lines):
        last = i == len(lines) - 1
        if ln.strip():
            rows.append((len(buf), _count(ln)))
        buf += ln
        if not last or final_newline:
            buf += newline
    path.write_bytes(bytes(buf))
    m = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
    if meta:
        save_meta(path, m, meta_dtype, extra_cols)
    return m


def _count(ln: bytes) -> int:
    try:
        return len(json.loads(ln)["tokens"])
    except Exception:
        return 1


def save_meta(bin_path, meta, dtype=np.int64, extra_cols=0):
    meta = np.asarray(meta)
    if extra_cols:
        extra = np.full((len(meta), extra_cols), 999_999, dtype=np.int64)
        meta = np.concatenate([meta, extra], axis=1)
    with open(str(bin_path) + ".meta", "wb") as f:
        np.save(f, meta.astype(dtype))


def ref_labels(doc, zero_is_target=False) -> list[int]:
    """Aligned targets of one whole document: next token if it is a target, else -100."""
    out = []
    for i in range(len(doc)):
        if i + 1 < len(doc):
            t = doc[i + 1]
            out.append(t if (t > 0 or (zero_is_target and t == 0)) else IGNORE)
        else:
            out.append(IGNORE)
    return out


def ref_packs(docs, max_length, zero_is_target=False, drop_last=True):
    """Cut-mode packs of documents (already in table order), computed token by token."""
    ids, labels, doc_of = [], [], []
    for j, d in enumerate(docs):
        ids += [abs(t) for t in d]
        labels += ref_labels(d, zero_is_target)
        doc_of += [j] * len(d)
    packs = []
    for s in range(0, len(ids), max_length):
        e = s + max_length
        if e > len(ids) and drop_last:
            break
        chunk = doc_of[s:e]
        pos, cu = [], [0]
        for i, dj in enumerate(chunk):
            if i and dj != chunk[i - 1]:
                cu.append(i)
            pos.append(i - cu[-1])
        cu.append(len(chunk))
        packs.append({"input_ids": ids[s:e], "labels": labels[s:e], "position_ids": pos, "cu_seqlens": cu})
    tail = ids[len(packs) * max_length :]
    return packs, tail


def ref_unpacked(doc, max_length, zero_is_target=False):
    n = min(len(doc), max_length)
    return {
        "input_ids": [abs(t) for t in doc[:n]],
        "labels": ref_labels(doc, zero_is_target)[:n],
        "position_ids": list(range(n)),
        "cu_seqlens": [0, n],
    }


def as_lists(sample: dict) -> dict:
    return {k: np.asarray(sample[k]).tolist() for k in ("input_ids", "labels", "position_ids", "cu_seqlens")}
