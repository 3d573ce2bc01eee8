"""Raw text and chat logs -> InternLM-format shards (`tokentrain tokenize`).

Inputs, one record per document:
  * ``text``  -- ``.txt``: one document per line, or per blank-line-separated paragraph;
  * ``jsonl`` -- JSON lines with a ``text`` field (pre-training: every token a target);
  * ``chat``  -- JSON lines with ``messages: [{"role", "content"}, ...]`` (SFT).

Chat masking is by sign: the tokens of the roles in ``train_roles`` (default: assistant
replies, with their end marker) are positive; system, user and tool turns and the
template's scaffolding are negative. The conversation is rendered to text once with the
tokenizer's chat template (or a named one), tokenized as a whole, and each token takes
its sign from the character span it starts in -- so decoding ``abs(tokens)`` gives back
exactly the formatted text.

Records are encoded by a pool of workers in input order, so the same input gives the same
bytes; shards are written aside and moved into the output folder only when all inputs
succeeded.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from tokentrain.errors import ConfigError, DataError
from tokentrain.metrics.progress import Progress
from tokentrain.utils.paths import shown

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML, "internlm2": "{{ bos_token }}" + CHATML}
FORMATS = ("auto", "text", "jsonl", "chat")


@dataclass
class TokenizeOptions:
    tokenizer: str
    out: str
    fmt: str = "auto"
    txt_mode: str = "line"  # or "paragraph"
    train_roles: tuple[str, ...] = ("assistant",)
    chat_template: str | None = None  # a name from NAMED_TEMPLATES; default: the tokenizer's own
    shard_bytes: int = 256 << 20
    workers: int = 1
    skip_bad: bool = False
    add_bos: bool = True
    add_eos: bool = True
    progress: bool = True


@dataclass
class Summary:
    documents: int = 0
    tokens: int = 0
    target_tokens: int = 0
    skipped: int = 0
    bytes_in: int = 0
    seconds: float = 0.0
    shards: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class BadRecord(Exception):
    """A record that cannot become a document; carries the message only (place added later)."""


# --------------------------------------------------------------------------- encoding


class Encoder:
    """Turns one record into signed token ids; lives once per worker process."""

    def __init__(self, opts: TokenizeOptions):
        from transformers import AutoTokenizer

        self.opts = opts
        try:
            self.tok = AutoTokenizer.from_pretrained(opts.tokenizer)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--tokenizer {opts.tokenizer}: cannot load a tokenizer there ({e})") from None
        self.template: str | None
        if opts.chat_template:
            self.template = NAMED_TEMPLATES[opts.chat_template]
        else:
            self.template = getattr(self.tok, "chat_template", None)

    def text(self, text: str) -> np.ndarray:
        if not isinstance(text, str):
            raise BadRecord(f'"text" must be a string, got {type(text).__name__}')
        if not text.strip():
            raise BadRecord("empty document")
        ids = self.tok(text, add_special_tokens=True)["input_ids"]
        bos, eos = self.tok.bos_token_id, self.tok.eos_token_id
        if self.opts.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        if self.opts.add_eos and eos is not None and ids[-1] != eos:
            ids = ids + [eos]
        return np.asarray(ids, dtype=np.int64)

    def render(self, messages: list, generation_prompt: bool = False) -> str:
        text = self.tok.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
        )
        assert isinstance(text, str)  # tokenize=False: the rendered text
        return text

    def chat(self, messages) -> np.ndarray:
        if self.template is None:
            raise ConfigError(
                f"--tokenizer {self.opts.tokenizer} has no chat template; pass --chat-template chatml|internlm2"
            )
        _validate_messages(messages)
        full = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] not in self.opts.train_roles:
                continue
            upto = self.render(messages[: i + 1])
            if not full.startswith(upto):
                raise BadRecord(
                    "the chat template renders a conversation differently from its prefixes; cannot mask turns"
                )
            prefix = len(self.render(messages[:i])) if i else 0
            start = upto.find(m["content"], prefix) if m["content"] else -1
            spans.append((start if start >= 0 else prefix, len(upto)))
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        starts = np.asarray([s for s, _ in enc["offset_mapping"]], dtype=np.int64)
        trained = np.zeros(len(ids), dtype=bool)
        for s, e in spans:
            trained |= (starts >= s) & (starts < e)
        return np.where(trained, ids, -ids)

    def encode(self, kind: str, payload) -> np.ndarray:
        return self.chat(payload) if kind == "chat" else self.text(payload)


def _validate_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise BadRecord('"messages" must be a non-empty list')
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRecord(f'messages[{j}] must be an object with "role" and "content"')
        if m["role"] not in ROLES:
            raise BadRecord(f"messages[{j}]: unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise BadRecord(f'messages[{j}]: "content" must be a string')


_ENCODER: Encoder | None = None


def _init_worker(opts: TokenizeOptions) -> None:
    global _ENCODER
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _ENCODER = Encoder(opts)


def _encode_chunk(job: tuple[list[tuple[int, str, object]], int]) -> tuple[list[tuple[int, np.ndarray | str]], int]:
    """Encode a chunk of records; its input byte count travels with it (for progress)."""
    chunk, nbytes = job
    assert _ENCODER is not None, "_init_worker first"
    out: list[tuple[int, np.ndarray | str]] = []
    for lineno, kind, payload in chunk:
        if isinstance(payload, BadRecord):
            out.append((lineno, str(payload)))
            continue
        try:
            out.append((lineno, _ENCODER.encode(kind, payload)))
        except BadRecord as e:
            out.append((lineno, str(e)))
    return out, nbytes


# --------------------------------------------------------------------------- reading


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.suffix == ".txt":
        return "text"
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                try:
                    row = orjson.loads(line)
                except orjson.JSONDecodeError:
                    raise DataError(f"{path}: line 1 is not JSON; pass --format text for plain text") from None
                if isinstance(row, dict) and "messages" in row:
                    return "chat"
                return "jsonl"
    return "jsonl"


def read_records(path: Path, kind: str, txt_mode: str, sizes: list | None = None):
    """Yield (line number, kind, payload | BadRecord). With ``sizes`` (a one-item list), add the
    input bytes read to sizes[0] as lines are read (text: UTF-8 length, CRLF counted as LF)."""
    sizes = sizes if sizes is not None else [0]
    if kind == "text":
        with open(path, encoding="utf-8", errors="strict") as f:
            if txt_mode == "line":
                for lineno, line in enumerate(f, 1):
                    sizes[0] += len(line.encode("utf-8"))
                    if line.strip():
                        yield lineno, "text", line.rstrip("\n")
            else:
                para, first = [], None
                for lineno, line in enumerate(f, 1):
                    sizes[0] += len(line.encode("utf-8"))
                    if line.strip():
                        first = first or lineno
                        para.append(line.rstrip("\n"))
                    elif para:
                        yield first, "text", "\n".join(para)
                        para, first = [], None
                if para:
                    yield first, "text", "\n".join(para)
        return
    field_name = "messages" if kind == "chat" else "text"
    with open(path, "rb") as fb:
        for lineno, raw in enumerate(fb, 1):
            sizes[0] += len(raw)
            if not raw.strip():
                continue
            try:
                row = orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                yield lineno, kind, BadRecord(f"malformed JSON ({e})")
                continue
            if not isinstance(row, dict) or field_name not in row:
                yield lineno, kind, BadRecord(f'missing "{field_name}" field')
                continue
            yield lineno, ("chat" if kind == "chat" else "text"), row[field_name]


# --------------------------------------------------------------------------- driver


def tokenize_files(inputs: list[str | Path], opts: TokenizeOptions) -> Summary:
    from tokentrain.data.writer import ShardWriter

    if opts.fmt not in FORMATS:
        raise ConfigError(f"--format {opts.fmt!r}: choose one of {', '.join(FORMATS)}")
    if opts.chat_template and opts.chat_template not in NAMED_TEMPLATES:
        raise ConfigError(f"--chat-template {opts.chat_template!r}: choose one of {', '.join(NAMED_TEMPLATES)}")
    bad_roles = [r for r in opts.train_roles if r not in ROLES]
    if bad_roles:
        raise ConfigError(f"--train-roles: unknown role(s) {', '.join(bad_roles)} (expected {', '.join(ROLES)})")
    from tokentrain.model.source import check_model_source

    check_model_source(opts.tokenizer, "--tokenizer", need_config=False)  # before any worker starts
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{shown(p)}: input file does not exist")
    stems = [p.name.split(".")[0] for p in paths]
    if len(set(stems)) != len(stems):
        raise ConfigError("input files must have distinct names (their stems name the output shards)")

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".tokenize-{os.getpid()}.tmp"
    summary = Summary(bytes_in=sum(p.stat().st_size for p in paths))
    t0 = time.perf_counter()
    pool = None
    mapper: Callable[[Iterable], Iterator[tuple[list[tuple[int, np.ndarray | str]], int]]]
    try:
        if opts.workers > 1:
            import multiprocessing as mp

            pool = mp.get_context("spawn").Pool(opts.workers, initializer=_init_worker, initargs=(opts,))
            mapper = lambda chunks: pool.imap(_encode_chunk, chunks)  # noqa: E731 (ordered => deterministic)
        else:
            _init_worker(opts)
            mapper = lambda chunks: map(_encode_chunk, chunks)  # noqa: E731
        progress = Progress(summary.bytes_in, "tokenize", opts.progress)
        for path, stem in zip(paths, stems):
            kind = detect_format(path, opts.fmt)
            writer = ShardWriter(staging, stem, opts.shard_bytes)
            sizes, credited = [0], 0
            for chunk_out, upto in mapper(_chunks(read_records(path, kind, opts.txt_mode, sizes), 64, sizes)):
                # Progress counts a chunk's bytes once its records are encoded (not when read ahead).
                progress.update(upto - credited, len(chunk_out))
                credited = upto
                for lineno, res in chunk_out:
                    if not isinstance(res, str):
                        writer.add(res)
                        summary.target_tokens += int((res > 0).sum())
                        continue
                    msg = f"{path}: line {lineno}: {res}"
                    if not opts.skip_bad:
                        raise DataError(msg + "; fix the record or pass --skip-bad to skip such records")
                    summary.skipped += 1
                    log.warning("skipped %s", msg)
            writer.close()
            summary.documents += writer.documents
            summary.tokens += writer.tokens
            progress.update(path.stat().st_size - credited)  # the exact size (CRLF, trailing bytes)
        progress.close()
        # Every input succeeded: move the shards into place.
        for p in sorted(staging.iterdir()):
            os.replace(p, out / p.name)
            if p.suffix == ".bin":
                summary.shards.append(str(out / p.name))
    finally:
        if pool is not None:
            pool.terminate()
        shutil.rmtree(staging, ignore_errors=True)
    summary.seconds = time.perf_counter() - t0
    if summary.skipped:
        log.warning("skipped %d bad record(s) (--skip-bad)", summary.skipped)
    return summary


def _chunks(it, n: int, sizes: list):
    """Chunks of n records, each with the input bytes read up to its end (from ``sizes``)."""
    chunk = []
    for item in it:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk, sizes[0]
            chunk = []
    if chunk:
        yield chunk, sizes[0]
