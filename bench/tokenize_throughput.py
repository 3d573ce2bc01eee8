"""Throughput of `tokentrain tokenize` on a >= 50 MB corpus.

Corpus: Python source files found on this machine (the interpreter's standard library and
site-packages), one document per file, as JSONL `text` records -- real, varied text that
needs no download. Tokenizer: a 32k byte-level BPE trained offline on a 4 MB sample of it
(`tokenizers`), saved as a Hugging Face folder. Prints the figures and the command.

    .venv/bin/python bench/tokenize_throughput.py [--mb 60] [--workers 2]
"""

import argparse
import json
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path


def build_corpus(path: Path, mb: int) -> int:
    roots = {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]}
    size, limit = 0, mb << 20
    with open(path, "w") as out:
        for root in sorted(roots):
            for dirpath, dirnames, files in os.walk(root):
                dirnames.sort()
                for name in sorted(files):
                    if not name.endswith(".py"):
                        continue
                    try:
                        text = Path(dirpath, name).read_text(encoding="utf-8")
                    except (UnicodeDecodeError, OSError):
                        continue
                    if not text.strip():
                        continue
                    line = json.dumps({"text": text}) + "\n"
                    out.write(line)
                    size += len(line)
                    if size >= limit:
                        return size
    return size


def build_tokenizer(corpus: Path, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def sample():
        n = 0
        with open(corpus) as f:
            for line in f:
                text = json.loads(line)["text"]
                n += len(text)
                yield text
                if n > 4 << 20:
                    return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        sample(),
        trainers.BpeTrainer(
            vocab_size=32000,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>").save_pretrained(
        out
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=60)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "tokentrain-bench-tokenize"))
    args = ap.parse_args()
    from tokentrain.tools.tokenize import TokenizeOptions, tokenize_files

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    if not corpus.exists() or corpus.stat().st_size < (args.mb << 20) * 0.99:
        build_corpus(corpus, args.mb)
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        build_tokenizer(corpus, tok_dir)
    mb = corpus.stat().st_size / 1e6
    rows = []
    for workers in sorted({1, args.workers}):
        out = work / f"out-w{workers}"
        t0 = time.perf_counter()
        s = tokenize_files(
            [corpus], TokenizeOptions(str(tok_dir), str(out), fmt="jsonl", workers=workers, progress=False)
        )
        wall = time.perf_counter() - t0
        rows.append((workers, s.documents, s.tokens, wall, s.tokens / wall, mb / wall))
    print(f"command: {sys.executable} bench/tokenize_throughput.py --mb {args.mb} --workers {args.workers}")
    print(f"corpus: {mb:.1f} MB of Python source, {rows[0][1]} documents; tokenizer: 32k byte-level BPE")
    print("| workers | tokens | wall s | tokens/s | MB/s |")
    print("|---|---|---|---|---|")
    for w, _, t, wall, tps, mbs in rows:
        print(f"| {w} | {t:,} | {wall:.1f} | {tps:,.0f} | {mbs:.2f} |")
    if len(rows) > 1:
        print(f"speed-up {rows[-1][0]} workers vs 1: {rows[0][3] / rows[-1][3]:.2f}x")


if __name__ == "__main__":
    main()
