"""The InternLM repository data format: the one place that defines it.

A *dataset* is a folder. Its data files are found by `discover_files`:

* walked recursively with ``os.walk(followlinks=True)``: a folder's own files (sorted by
  name) come before its sub-folders (visited in sorted order) -- the order InternLM's own
  tools use; files are taken when their name ends with ``file_type`` (default ``.bin``);
  symlink loops are detected and skipped (counted in the log), never followed forever;
  a folder or file reached a second time (a symlink to a sibling, to a file already
  found) is read once, by real path (logged);
* or, when a ``data_order_path`` text file is given, exactly the files it lists (paths
  relative to the folder, one per line, blank lines ignored), in that order.

A data file ``X.bin`` holds one JSON object per line with a ``"tokens"`` list of ints.
Its index ``X.bin.meta`` is a ``numpy.save``d integer array of shape ``(N, >=2)``:
column 0 is the byte offset of line i, column 1 its token count. Extra columns are
ignored (the length is column 1, never "the last column").

Token semantics: a token ``t`` feeds the model as input id ``abs(t)``. It is a training
*target* iff ``t > 0`` -- so id 0 is never a target, as in the format's origin -- unless
``zero_is_target`` is set, in which case ``t >= 0`` is a target. Targets are aligned here,
not in the model: at position i the target is token i+1 of the same document (or
``IGNORE_INDEX`` when that token is not a target); the last token of every document has
target ``IGNORE_INDEX``, so no document is ever trained to predict the next one.

Lines are read by `tokentrain.data.fastjson` (exact, vectorised) and, when it is unsure,
strictly by orjson here, whose error names the file, line and byte.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import orjson

from tokentrain.data import fastjson
from tokentrain.errors import DataError
from tokentrain.utils.paths import shown

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
DEFAULT_FILE_TYPE = ".bin"
META_SUFFIX = ".meta"
_NL = 0x0A

# --------------------------------------------------------------------------- files


def discover_files(
    folder: str | os.PathLike,
    file_type: str = DEFAULT_FILE_TYPE,
    data_order_path: str | os.PathLike | None = None,
) -> list[Path]:
    """Return the data files of a dataset folder, in training order (see module doc)."""
    root = Path(folder)
    if not root.exists():
        raise DataError(f"{shown(root)}: dataset folder does not exist; check `dataset_folder`")
    if not root.is_dir():
        raise DataError(f"{shown(root)}: dataset folder is not a directory; point `dataset_folder` at a folder")
    if data_order_path is not None:
        return _files_from_order(root, Path(data_order_path))

    files: list[Path] = []
    loops = twice = 0
    # Real paths of each walked folder and of all folders above it on its walk path: a
    # sub-folder resolving to one of them is a symlink loop (the walk would never end).
    chain: dict[str, frozenset[str]] = {str(root): frozenset({os.path.realpath(root)})}
    # Every folder and file is read once, by real path: a second way to it (a symlink to a
    # sibling, a link to a file) would silently double its documents' share of training.
    claimed: dict[str, str] = {os.path.realpath(root): str(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        above = chain.pop(dirpath)
        keep = []
        # Real folders claim their path before the links beside them (`again -> sub`: sub is read).
        for d in sorted(dirnames, key=lambda d: (os.path.islink(os.path.join(dirpath, d)), d)):
            sub = os.path.join(dirpath, d)
            real = os.path.realpath(sub)
            if real in above:
                loops += 1
                log.warning("%s: symlink loop (points back to %s); not followed", sub, real)
            elif real in claimed:
                twice += 1
                log.warning("%s: the same folder as %s (a symlink); read once, not twice", sub, claimed[real])
            else:
                keep.append(d)
                claimed[real] = sub
                chain[sub] = above | {real}
        dirnames[:] = sorted(keep)
        for n in sorted(filenames):
            if not n.endswith(file_type):
                continue
            p = os.path.join(dirpath, n)
            real = os.path.realpath(p)
            if real in claimed:
                twice += 1
                log.warning("%s: the same file as %s (a link); read once, not twice", p, claimed[real])
                continue
            claimed[real] = p
            files.append(Path(p))
    if loops:
        log.warning("skipped %d symlink loop(s) under %s", loops, root)
    if twice:
        log.warning(
            "skipped %d second path(s) to a folder or file already read under %s (to repeat data, use a "
            "`datasets` mixture weight)",
            twice,
            root,
        )
    if not files:
        raise DataError(
            f"{shown(root)}: no files ending with {file_type!r} found; check `dataset_folder` and `file_type`"
        )
    return files


def _files_from_order(root: Path, order: Path) -> list[Path]:
    try:
        text = order.read_text()
    except OSError as e:
        raise DataError(f"{order}: cannot read data order file ({e.strerror})") from None
    files: list[Path] = []
    seen: dict[Path, int] = {}  # resolved path -> line it is listed on
    for lineno, line in enumerate(text.splitlines(), 1):
        rel = line.strip()
        if not rel:
            continue
        p = root / rel
        if not p.resolve().is_relative_to(root.resolve()):
            raise DataError(f"{order}:{lineno}: {rel!r} is outside the dataset folder {root}; list only files under it")
        if not p.is_file():
            raise DataError(
                f"{order}:{lineno}: listed file {rel!r} does not exist under {root}; fix the list or "
                "regenerate it with `tokentrain data order`"
            )
        if p.resolve() in seen:
            raise DataError(
                f"{order}:{lineno}: {rel!r} is listed twice (first on line {seen[p.resolve()]}); each file once, "
                "or regenerate the list with `tokentrain data order`"
            )
        seen[p.resolve()] = lineno
        files.append(p)
    if not files:
        raise DataError(f"{order}: data order file lists no files")
    return files


def relative_order(folder: str | os.PathLike, file_type: str = DEFAULT_FILE_TYPE) -> list[str]:
    """Paths of the data files relative to `folder`, in walk order (InternLM's get_data_order)."""
    root = Path(folder)
    return [str(p.relative_to(root)) for p in discover_files(root, file_type)]


# --------------------------------------------------------------------------- meta


def meta_path(bin_path: Path) -> Path:
    return bin_path.with_name(bin_path.name + META_SUFFIX)


def read_meta(path: Path, data_path: Path, data_size: int) -> np.ndarray:
    """Load and validate a ``.meta`` file against its data file; return (N, 2) int64.

    Checks cost O(N) in memory and two small reads of the data file, so opening a
    terabyte corpus stays fast; each line is checked again when it is read.
    """
    try:
        raw = np.load(path, allow_pickle=False)
    except OSError as e:
        if e.errno is None:  # numpy's own "not a .npy file" (no errno): a damaged meta
            raise DataError(
                f"{path}: not a readable numpy .npy meta file ({e}); rebuild it with `tokentrain data index --rebuild`"
            ) from None
        raise DataError(f"{path}: cannot read the meta file ({e.strerror}); check its permissions") from None
    except Exception as e:  # numpy raises ValueError/OSError/EOFError/UnpicklingError...
        raise DataError(
            f"{path}: not a readable numpy .npy meta file ({e}); rebuild it with `tokentrain data index --rebuild`"
        ) from None
    if not isinstance(raw, np.ndarray):  # an .npz archive
        raw.close()
        raise DataError(
            f"{path}: an .npz archive, not a .npy meta array; rebuild it with `tokentrain data index --rebuild`"
        )
    if raw.ndim != 2 or raw.shape[1] < 2:
        raise DataError(
            f"{path}: meta must have shape (N, >=2) (offset, token count), got {raw.shape}; rebuild it with "
            "`tokentrain data index --rebuild`"
        )
    if raw.dtype.kind not in "iu":
        raise DataError(
            f"{path}: meta must hold integers, got dtype {raw.dtype}; rebuild it with `tokentrain data index --rebuild`"
        )
    meta = np.ascontiguousarray(raw[:, :2], dtype=np.int64)
    n = len(meta)
    fix = "the meta is stale or corrupt; rebuild it with `tokentrain data index --rebuild`"
    if n == 0:
        if not _blank_prefix(data_path, data_size, whole_file=True):
            raise DataError(f"{path}: meta lists no lines but {data_path} has {data_size} bytes; {fix}")
        return meta
    offsets, counts = meta[:, 0], meta[:, 1]
    if offsets[0] != 0 and not (0 < offsets[0] < data_size and _blank_prefix(data_path, int(offsets[0]))):
        raise DataError(f"{path}: first line offset is {offsets[0]}, expected 0 (or only blank lines before it); {fix}")
    steps = np.diff(offsets)
    if (steps <= 0).any():
        i = int(np.flatnonzero(steps <= 0)[0]) + 1
        why = "negative" if offsets[i] < 0 else "not increasing"
        hint = " (int32 offsets overflowed past 2 GiB?)" if raw.dtype.itemsize == 4 else ""
        raise DataError(f"{path}: row {i}: byte offset {offsets[i]} is {why}{hint}; {fix}")
    if (counts < 0).any():
        i = int(np.flatnonzero(counts < 0)[0])
        raise DataError(f"{path}: row {i}: negative token count {counts[i]}; {fix}")
    last = int(offsets[-1])
    if last >= data_size:
        raise DataError(f"{path}: last line offset {last} is past the end of {data_path} ({data_size} bytes); {fix}")
    # The last line must run to the end of the file: anything after it means lines were
    # appended (or the file rewritten) after the meta was written.
    _check_zero_counts(path, data_path, meta, data_size, fix)
    with _open_data(data_path) as f:
        f.seek(last - 1 if last else 0)
        tail = f.read()
    if last and tail[0] != _NL:
        raise DataError(f"{path}: line {n} (byte {last}) of {data_path} does not start a line; {fix}")
    body = tail[1:] if last else tail
    nl = body.find(b"\n")
    if nl != -1 and body[nl + 1 :].strip():
        raise DataError(f"{path}: {data_path} has more lines than the meta's {n} (appended after indexing?); {fix}")
    try:  # a truncated or rewritten last line
        parse_line(body, data_path, n, last, int(counts[-1]))
    except DataError as e:
        raise DataError(
            f"{path}: the last line of {data_path} does not match the meta "
            f"({str(e).removeprefix(f'{data_path}: ')}); {fix}"
        ) from None
    return meta


def _open_data(data_path: Path):
    try:
        return open(data_path, "rb")
    except OSError as e:
        raise DataError(f"{data_path}: cannot read data file ({e.strerror}); check its permissions") from None


def _check_zero_counts(path: Path, data_path: Path, meta: np.ndarray, data_size: int, fix: str) -> None:
    """A row counting 0 tokens must be an empty document, not a real line a bad meta drops."""
    zero = np.flatnonzero(meta[:, 1] == 0)[:10000]
    if not len(zero):
        return
    ends = np.append(meta[1:, 0], data_size)
    with _open_data(data_path) as f:
        for i in zero.tolist():
            f.seek(int(meta[i, 0]))
            line = f.read(int(ends[i] - meta[i, 0]))
            try:
                n = len(parse_line(line, data_path, i + 1, int(meta[i, 0])))
            except DataError:
                n = -1
            if n != 0:
                got = f"{n} tokens" if n > 0 else "no valid document"
                raise DataError(f"{path}: row {i}: 0 tokens, but line {i + 1} of {data_path} has {got}; {fix}")


def _blank_prefix(data_path: Path, nbytes: int, whole_file: bool = False, chunk: int = 1 << 20) -> bool:
    """Whether the first `nbytes` of the file are blank lines (build_meta skips those); read
    in chunks, so a prefix of any length is accepted as build_meta accepts it."""
    if nbytes == 0:
        return True
    last = b""
    with _open_data(data_path) as f:
        left = nbytes
        while left:
            block = f.read(min(chunk, left))
            if not block or block.strip():
                return False
            left -= len(block)
            last = block
    return whole_file or last.endswith(b"\n")


def build_meta(data_path: Path) -> np.ndarray:
    """Scan a data file and return its (N, 2) int64 meta (offset, token count).

    Blank lines (and a missing final newline) are tolerated; every other line must parse.
    """
    data = data_path.read_bytes()
    buf = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(buf == _NL) + 1
    starts = np.concatenate(([0], ends))
    ends = np.concatenate((ends, [len(data)]))
    rows = []
    for lineno, (s, e) in enumerate(zip(starts.tolist(), ends.tolist()), 1):
        if not data[s:e].strip():
            continue
        tokens = parse_line(data[s:e], data_path, lineno, s)
        rows.append((s, len(tokens)))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def save_meta(meta: np.ndarray, path: Path) -> None:
    from tokentrain.utils.atomic import atomic_file

    with atomic_file(path) as f:
        np.save(f, np.asarray(meta, dtype=np.int64))


# --------------------------------------------------------------------------- lines


def parse_line(line: bytes, path: Path | str, lineno: int, offset: int, expected: int | None = None) -> np.ndarray:
    """Parse one JSON line into its signed tokens (int64); raise DataError naming the place.

    `expected` is the meta's token count; a mismatch means the meta is stale.
    """
    tokens = fastjson.parse_fast(line)
    if tokens is None:
        tokens = _parse_strict(line, path, lineno, offset)
    if expected is not None and len(tokens) != expected:
        raise DataError(
            f"{path}: line {lineno} (byte {offset}): has {len(tokens)} tokens but the meta says {expected}; "
            "the meta is stale; rebuild it with `tokentrain data index --rebuild`"
        )
    return tokens


def _parse_strict(line: bytes, path, lineno: int, offset: int) -> np.ndarray:
    where = f"{path}: line {lineno} (byte {offset})"
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e}); fix or remove the line, then rebuild the meta") from None
    if not isinstance(obj, dict) or "tokens" not in obj:
        raise DataError(f'{where}: no "tokens" key; each line must be a JSON object like {{"tokens": [1, -5, 2]}}')
    toks = obj["tokens"]
    if not isinstance(toks, list):
        raise DataError(f'{where}: "tokens" must be a list of ints, got {type(toks).__name__}')
    for j, t in enumerate(toks):
        if type(t) is not int:
            raise DataError(f'{where}: "tokens"[{j}] is {t!r} ({type(t).__name__}); token ids must be ints')
        if not -fastjson.INT32_LIMIT <= t <= fastjson.INT32_LIMIT:
            raise DataError(f'{where}: "tokens"[{j}] = {t} is out of range for a token id')
    return np.asarray(toks, dtype=np.int64).reshape(-1)


# --------------------------------------------------------------------------- tokens


def inputs_and_targets(raw: np.ndarray, zero_is_target: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Input ids and aligned targets of one whole document (see module doc)."""
    ids = np.abs(raw)
    targets = np.full(len(raw), IGNORE_INDEX, dtype=np.int64)
    nxt = raw[1:]
    is_target = nxt >= 0 if zero_is_target else nxt > 0
    targets[:-1] = np.where(is_target, nxt, IGNORE_INDEX)
    return ids, targets
