"""`tokentrain tokenize`: raw text / chat JSONL -> InternLM-format shards."""

from __future__ import annotations

import os


def register(sub, common) -> None:
    p = sub.add_parser(
        "tokenize", help="tokenize text / JSONL / chat JSONL into InternLM-format .bin + .meta", parents=[common]
    )
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT", help=".txt, JSONL with a 'text' field, or chat JSONL with 'messages'"
    )
    p.add_argument("--tokenizer", required=True, metavar="PATH", help="Hugging Face tokenizer folder (or hub id)")
    p.add_argument("--out", required=True, metavar="DIR", help="output dataset folder")
    p.add_argument("--format", dest="fmt", default="auto", choices=["auto", "text", "jsonl", "chat"])
    p.add_argument(
        "--txt-mode",
        default="line",
        choices=["line", "paragraph"],
        help=".txt: a document per line or per blank-line-separated paragraph",
    )
    p.add_argument(
        "--train-roles",
        default="assistant",
        help="comma-separated chat roles whose tokens are targets (default: assistant)",
    )
    p.add_argument(
        "--chat-template", choices=["chatml", "internlm2"], help="named template (default: the tokenizer's own)"
    )
    p.add_argument("--shard-size-mb", type=float, default=256.0, help="maximum shard size in MiB")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)), help="parallel encoder processes")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad records instead of stopping")
    p.add_argument("--no-bos", action="store_true", help="plain text: don't add the tokenizer's BOS")
    p.add_argument("--no-eos", action="store_true", help="plain text: don't add the tokenizer's EOS")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_tokenize)


def cmd_tokenize(args) -> int:
    from tokentrain.tools.tokenize import TokenizeOptions, tokenize_files

    opts = TokenizeOptions(
        tokenizer=args.tokenizer,
        out=args.out,
        fmt=args.fmt,
        txt_mode=args.txt_mode,
        train_roles=tuple(r.strip() for r in args.train_roles.split(",") if r.strip()),
        chat_template=args.chat_template,
        shard_bytes=int(args.shard_size_mb * (1 << 20)),
        workers=args.workers,
        skip_bad=args.skip_bad,
        add_bos=not args.no_bos,
        add_eos=not args.no_eos,
        progress=not args.no_progress,
    )
    s = tokenize_files(args.inputs, opts)
    print(
        f"tokenized {s.documents} documents, {s.tokens} tokens ({s.target_tokens} targets) into "
        f"{len(s.shards)} shard(s) "
        f"in {args.out}; {s.skipped} skipped; {s.seconds:.1f}s, {s.tokens_per_s:,.0f} tokens/s, "
        f"{s.bytes_in / max(s.seconds, 1e-9) / 1e6:.1f} MB/s"
    )
    return 0
