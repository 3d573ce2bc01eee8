"""Independent helpers for the data-layer tests: they write InternLM-format files and
compute what the data layer should produce, without using tokentrain's own code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

IGNORE = -100


def tt(*argv, cache: Path, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    """`tokentrain ARGV` in a subprocess with its own TOKENTRAIN_CACHE (and `env` added), no stdin."""
    env = dict(os.environ, TOKENTRAIN_CACHE=str(cache), **env)
    return subprocess.run([sys.executable, "-m", "tokentrain", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip


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


# --------------------------------------------------------------------------- broken datasets
# The catalogue of bad inputs, used by the data CLI tests and, through `tokentrain train`,
# by tests/reliability.


def make_bad_dataset(root: Path, case: str) -> tuple[Path, list[str], str]:
    """Make a broken dataset; return (folder, extra args, regex the error must match)."""
    a = root / "a.bin"
    good = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    if case == "missing_folder":
        return root / "nope", [], r"nope: dataset folder does not exist"
    if case == "no_files":
        (root / "x.txt").write_text("hi")
        return root, [], r"no files ending with '.bin' found"
    if case == "order_missing_entry":
        write_bin(a, good)
        (root / "order.txt").write_text("a.bin\ngone.bin\n")
        return root, ["--data-order", str(root / "order.txt")], r"order.txt:2: listed file 'gone.bin' does not exist"
    if case in ("malformed_json", "missing_tokens", "float", "string", "nested", "bool"):
        bad = {
            "malformed_json": b'{"tokens": [4, 5}',
            "missing_tokens": b'{"ids": [4, 5]}',
            "float": b'{"tokens": [4, 5.0]}',
            "string": b'{"tokens": ["4", 5]}',
            "nested": b'{"tokens": [[4], 5]}',
            "bool": b'{"tokens": [4, false]}',
        }[case]
        write_bin(a, None, raw_lines=[line_bytes(good[0], b""), bad, line_bytes(good[2], b"")], meta=False)
        return root, [], rf"a.bin: line 2 \(byte {len(line_bytes(good[0]))}\): "
    write_bin(a, good)
    mp = a.with_name(a.name + ".meta")
    m = np.load(mp)
    if case == "meta_not_npy":
        mp.write_bytes(b"garbage")
        return root, [], r"a.bin.meta: not a readable numpy"
    if case == "meta_1d":
        np.save(mp.open("wb"), m[:, 0])
        return root, [], r"a.bin.meta: meta must have shape \(N, >=2\)"
    if case == "meta_one_column":
        np.save(mp.open("wb"), m[:, :1])
        return root, [], r"a.bin.meta: meta must have shape"
    if case == "meta_decreasing":
        np.save(mp.open("wb"), m[[0, 2, 1]])
        return root, [], r"a.bin.meta: row 2: byte offset \d+ is not increasing"
    if case == "meta_negative":
        m[1, 0] = -3
        np.save(mp.open("wb"), m)
        return root, [], r"a.bin.meta: row 1: byte offset -3 is negative"
    if case == "meta_int32_wrapped":
        m[1, 0], m[2, 0] = 2**31 - 10, 2**31 + 10
        np.save(mp.open("wb"), m.astype(np.int32))
        return root, [], r"a.bin.meta: row 2: .*int32 offsets overflowed"
    if case == "appended":
        with a.open("ab") as f:
            f.write(line_bytes([10, 11]))
        return root, [], r"a.bin.meta: .*appended after indexing"
    if case == "truncated":
        a.write_bytes(a.read_bytes()[:-6])
        return root, [], r"a.bin.meta: .*does not match the meta"
    if case == "rewritten_same_size":  # the meta still fits the file's ends: caught line by line
        a.write_bytes(line_bytes([1, 2, 3, 4]) + line_bytes([5]) + line_bytes([6, 7, 8, 9]))
        return (
            root,
            ["--no-shuffle"],
            r"a.bin: line 1 \(byte 0\)(:)? (runs on past|the line runs on past) where the meta says it ends",
        )
    if case == "rewritten":
        a.write_bytes(line_bytes([1, 2, 3, 4, 5]) + line_bytes([6]) + line_bytes([7, 8, 9]))
        return root, [], r"a.bin.meta: line 3 \(byte \d+\) of .*a.bin does not start a line"
    raise AssertionError(case)


BAD_DATASETS = [
    "missing_folder",
    "no_files",
    "order_missing_entry",
    "malformed_json",
    "missing_tokens",
    "float",
    "string",
    "nested",
    "bool",
    "meta_not_npy",
    "meta_1d",
    "meta_one_column",
    "meta_decreasing",
    "meta_negative",
    "meta_int32_wrapped",
    "appended",
    "truncated",
    "rewritten",
    "rewritten_same_size",
]
