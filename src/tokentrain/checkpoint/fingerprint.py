"""The run fingerprint: what a checkpoint's training depended on, compared on resume.

Saved as ``fingerprint.json`` in every checkpoint. Resuming with a different sample stream
(other documents, max_length, packing, shuffle, seed, ...), another model shape or another
global batch would go on as if nothing changed and train on the wrong thing; so any
difference is refused in one line naming the setting. ``resume_ignore = ['max_length']``
(or ``--cfg-options resume_ignore=max_length,seed``) lets an expert go on anyway, logged.
The world size is recorded but not compared: only the global batch matters.

Data files are identified by name (relative to the dataset folder), size, the SHA-256 of
their meta, of their first and last 64 KiB, and of their whole contents: a document changed
anywhere, even with every length the same, is seen. The whole-file digest is cached per
version of the file (data/digest.py), so it costs one read of a new or changed file, then a
`stat` per start. Checkpoints written before it (3 items per file) are compared on the items
they have.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from tokentrain.errors import ConfigError

log = logging.getLogger("tokentrain.train")

FINGERPRINT = "fingerprint.json"
VERSION = 1
DATA_SETTINGS = (
    "max_length",
    "pack_to_max_length",
    "shuffle_before_pack",
    "seed",
    "min_length",
    "zero_is_target",
    "file_type",
)
MODEL_KEYS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
)
# What resume_ignore may name (besides every key of DATA_SETTINGS). Not "model": the
# checkpoint's weights do not fit a model of another shape, so no resume could go on.
IGNORABLE = (*DATA_SETTINGS, "data_order", "dataset", "val_dataset", "global_batch")
_EDGE = 64 << 10


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _edges(path: Path, size: int) -> str:
    with open(path, "rb") as f:
        head = f.read(_EDGE)
        if size > 2 * _EDGE:
            f.seek(size - _EDGE)
        tail = f.read(_EDGE) if size > _EDGE else b""
    return _sha(head + tail)


def dataset_fingerprint(folder: str, file_type: str, data_order_path: str | None) -> dict:
    """{relative name: [size, meta sha, edge sha, content sha]} of a dataset's files, in training order."""
    import time

    from tokentrain.data import format as fmt
    from tokentrain.data.digest import file_digest
    from tokentrain.data.index import ensure_meta

    t0 = time.perf_counter()

    root = Path(folder)
    out = {}
    for p in fmt.discover_files(root, file_type, data_order_path):
        size = p.stat().st_size
        meta = _sha(ensure_meta(p).read_bytes()) if size else None
        name = p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)
        out[name] = [size, meta, _edges(p, size) if size else None, file_digest(p) if size else None]
    took = time.perf_counter() - t0
    if took > 5:
        log.info(
            "fingerprinted %d data file(s) of %s in %.1fs (digests cached for the next start)", len(out), folder, took
        )
    return out


def train_data_fingerprint(cfg) -> dict:
    """The training files: of `dataset_folder`, or of each source of a `datasets = [...]` mixture
    (files prefixed with the source's name, and its weight)."""
    sources = getattr(cfg, "datasets", None)
    if not sources:
        return dataset_fingerprint(cfg.dataset_folder, cfg.file_type, cfg.data_order_path)
    out = {}
    for d in sources:
        name = d.get("name") or Path(d["folder"]).name
        out[f"{name} (weight)"] = [d.get("weight"), None, None]
        for rel, v in dataset_fingerprint(d["folder"], cfg.file_type, cfg.data_order_path).items():
            out[f"{name}/{rel}"] = v
    return out


def run_fingerprint(cfg, model_config, vocab_size: int, world_size: int) -> dict:
    """Everything the checkpoint's training depended on, as plain JSON."""
    order = None
    if cfg.data_order_path:
        order = _sha(Path(cfg.data_order_path).read_bytes())
    model = {k: getattr(model_config, k, None) for k in MODEL_KEYS}
    model["vocab_size"] = int(vocab_size)
    return {
        "version": VERSION,
        "settings": {k: getattr(cfg, k) for k in DATA_SETTINGS},
        "data_order": order,
        "dataset": train_data_fingerprint(cfg),
        "val_dataset": dataset_fingerprint(cfg.val_dataset_folder, cfg.file_type, cfg.data_order_path)
        if cfg.val_dataset_folder
        else None,
        "model": model,
        "global_batch": cfg.batch_size * cfg.accumulative_counts * world_size,
        "world_size": world_size,
    }


def save(folder: Path, fingerprint: dict) -> None:
    (Path(folder) / FINGERPRINT).write_text(json.dumps(fingerprint, indent=1, sort_keys=True))


def check_ignore_keys(keys: list[str]) -> None:
    unknown = [k for k in keys if k not in IGNORABLE]
    if unknown:
        raise ConfigError(f"resume_ignore: unknown key {unknown[0]!r}; known: {', '.join(IGNORABLE)}")


def _dataset_change(old: dict, new: dict) -> str:
    gone = [n for n in old if n not in new]
    added = [n for n in new if n not in old]
    if gone or added:
        parts = ([f"{len(gone)} file(s) gone (e.g. {gone[0]})"] if gone else []) + (
            [f"{len(added)} new (e.g. {added[0]})"] if added else []
        )
        return ", ".join(parts)
    if list(old) != list(new):
        return "the files' order changed"
    for n, (o, w) in ((n, (old[n], new[n])) for n in old):
        if o[0] != w[0]:
            return f"{n} is {w[0]}, {o[0]} then" if n.endswith(" (weight)") else f"{n} is {w[0]} bytes, {o[0]} then"
        if any(a != b for a, b in zip(o[1:], w[1:])):  # an older checkpoint has fewer items: those it has
            return f"{n} has other contents (same size)"
    return ""


def differences(old: dict, new: dict) -> list[tuple[str, str]]:
    """(key, what changed) for every difference between a checkpoint's fingerprint and this run's."""
    out = []
    for k in DATA_SETTINGS:
        o, w = old.get("settings", {}).get(k), new["settings"].get(k)
        if o != w:
            out.append((k, f"{k} = {w!r}, the checkpoint was trained with {o!r}"))
    if old.get("data_order") != new["data_order"]:
        out.append(("data_order", "the data_order_path file (list and order of data files) differs"))
    for k, what in (("dataset", "training"), ("val_dataset", "validation")):
        o, w = old.get(k), new[k]
        if (o is None) != (w is None):
            out.append((k, f"the {what} set was {'added' if o is None else 'removed'}"))
        elif o is not None and o != w:
            change = _dataset_change(o, w)
            if change:
                out.append((k, f"the {what} data changed: {change}"))
    o, w = old.get("model", {}), new["model"]
    diff = [f"{k} {o.get(k)} -> {w[k]}" for k in w if o.get(k) != w[k]]
    if diff:
        out.append(("model", f"the model has another shape ({', '.join(diff)})"))
    if old.get("global_batch") != new["global_batch"]:
        out.append(
            (
                "global_batch",
                f"global batch (batch_size x accumulative_counts x world size) is {new['global_batch']}, "
                f"the checkpoint was trained with {old.get('global_batch')}",
            )
        )
    return out


def check_resume(folder: Path | None, fingerprint: dict, ignore: list[str]) -> None:
    """Refuse to resume from `folder` when this run differs from the one that wrote it."""
    if folder is None:
        return
    check_ignore_keys(ignore)
    try:
        old = json.loads((Path(folder) / FINGERPRINT).read_text())
    except FileNotFoundError:
        log.warning("%s has no %s (written by an older version): cannot check it is the same run", folder, FINGERPRINT)
        return
    except (OSError, ValueError) as e:
        raise ConfigError(f"{Path(folder) / FINGERPRINT}: unreadable ({e}); resume from another checkpoint") from None
    diffs = differences(old, fingerprint)
    ignored = [(k, w) for k, w in diffs if k in ignore]
    for _, what in ignored:
        log.warning("resuming from %s although %s (resume_ignore)", folder, what)
    refused = [(k, w) for k, w in diffs if k not in ignore]
    if refused:
        _, what = refused[0]
        more = f" (and {len(refused) - 1} more: {', '.join(k for k, _ in refused[1:])})" if len(refused) > 1 else ""
        fixed = [k for k, _ in refused if k not in IGNORABLE]
        way = (
            f"; {fixed[0]} cannot be ignored (the checkpoint's weights do not fit this model)"
            if fixed
            else f", or set resume_ignore = {[k for k, _ in refused]!r} to go on anyway"
        )
        raise ConfigError(
            f"cannot resume from {folder}: {what}{more}; resuming would train on something else. Restore it, "
            f"start a new --work-dir{way}"
        )
