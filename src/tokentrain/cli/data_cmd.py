"""`tokentrain data ...`: look at, check, index and make InternLM-format data."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def register(sub, common) -> None:
    data = sub.add_parser("data", help="inspect, check, index and synthesize InternLM-format data", parents=[common])
    dsub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True, parser_class=type(data))

    def folder_args(p, or_config: bool = False):
        """DIR, --file-type, --data-order; `or_config`: DIR may be left out for --config CFG."""
        if or_config:
            p.add_argument("folder", metavar="DIR", nargs="?", help="dataset folder (or --config)")
        else:
            p.add_argument("folder", metavar="DIR", help="dataset folder")
        p.add_argument("--file-type", default=".bin", help="data file suffix (default .bin)")
        p.add_argument("--data-order", metavar="FILE", help="text file listing the data files to use, in order")

    p = dsub.add_parser("stats", help="files, documents, tokens, target tokens, length percentiles", parents=[common])
    folder_args(p, or_config=True)
    p.add_argument(
        "--config",
        metavar="CFG",
        help="a training config: its dataset_folder, or per source of its `datasets` mixture the samples and "
        "the effective epochs at the planned steps",
    )
    p.add_argument("--world-size", type=int, default=1, help="data-parallel ranks planned (with --config)")
    p.add_argument(
        "--cfg-options", nargs="+", default=[], metavar="KEY=VALUE", help="override config settings (with --config)"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_stats)

    p = dsub.add_parser("show", help="print one sample exactly as training sees it", parents=[common])
    folder_args(p, or_config=True)
    p.add_argument(
        "--config",
        metavar="CFG",
        help="a training config: its data and data settings (max_length, seed, packing, a `datasets` mixture)",
    )
    p.add_argument(
        "--cfg-options", nargs="+", default=[], metavar="KEY=VALUE", help="override config settings (with --config)"
    )
    p.add_argument("--max-length", type=int, help="required without --config")
    p.add_argument("--index", type=int, default=0, help="sample number (with a mixture: the stream position)")
    p.add_argument("--no-shuffle", action="store_true", help="documents in file order")
    p.add_argument("--seed", type=int, default=1024, help="shuffle seed (default 1024, training's default)")
    p.add_argument("--unpacked", action="store_true", help="one document per sample (pack_to_max_length=False)")
    p.add_argument("--min-length", type=int, default=1)
    p.add_argument("--zero-is-target", action="store_true", help="token id 0 can be a target")
    p.add_argument("--tokenizer", metavar="PATH", help="HF tokenizer folder for a readable view")
    p.add_argument("--json", action="store_true", help="print the arrays as JSON")
    p.set_defaults(func=cmd_show)

    p = dsub.add_parser(
        "check",
        help="validate every line against its meta, and (--model / --config) the ids against the model; "
        "list every problem",
        parents=[common],
    )
    folder_args(p, or_config=True)
    p.add_argument("--model", metavar="MODEL", help="model folder: token ids must be < its config.json vocab_size")
    p.add_argument(
        "--config",
        metavar="CFG",
        help="a training config: its data (dataset_folder or `datasets`, and val_dataset_folder), its model's "
        "vocabulary, max_length, pack_to_max_length, zero_is_target",
    )
    p.add_argument("--max-length", type=int, help="count documents longer than this (with --model; --config has it)")
    p.add_argument(
        "--workers",
        type=int,
        help="processes reading files not yet summarised (default: the CPUs this process may use)",
    )
    p.set_defaults(func=cmd_check)

    p = dsub.add_parser("index", help="write missing (or, with --rebuild, all) .bin.meta files", parents=[common])
    folder_args(p)
    p.add_argument("--rebuild", action="store_true", help="rewrite every meta, not only missing ones")
    p.set_defaults(func=cmd_index)

    p = dsub.add_parser("order", help="write data_order.txt (relative paths in walk order)", parents=[common])
    p.add_argument("--data-folder", required=True, metavar="DIR")
    p.add_argument("--save-folder", required=True, metavar="OUT")
    p.add_argument("--file-type", default=".bin")
    p.set_defaults(func=cmd_order)

    p = dsub.add_parser("synth", help="write deterministic synthetic data (tests, benchmarks)", parents=[common])
    p.add_argument("out", metavar="OUT")
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--documents", type=int, default=1000, help="documents in all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mean-length", type=float, default=562.0)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.set_defaults(func=cmd_synth)


def _files(args):
    from tokentrain.data.format import discover_files

    return discover_files(args.folder, args.file_type, args.data_order)


def _progress(files, desc: str):
    """A bar on a terminal, periodic lines elsewhere (metrics/progress.py), over the files' bytes."""
    from tokentrain.metrics.progress import Progress

    total = 0
    for p in files:
        try:
            total += p.stat().st_size
        except OSError:  # named by the scan itself
            pass
    return Progress(total, desc)


def _summary(progress, what: str) -> None:
    progress.close()
    print(progress.summary(what), file=sys.stderr)


def cmd_stats(args) -> int:
    from tokentrain.data.inspect import dataset_stats
    from tokentrain.errors import ConfigError

    options = _options(args)
    if args.config:
        from tokentrain.config.loader import load_config

        cfg = load_config(args.config, options)
        if cfg.datasets:
            return _mixture_stats(cfg, args)
        args.folder, args.file_type, args.data_order = cfg.dataset_folder, cfg.file_type, cfg.data_order_path
    if not args.folder:
        raise ConfigError("data stats: give a dataset folder or --config CFG")
    files = _files(args)
    progress = _progress(files, "stats")
    st = dataset_stats(files, progress).as_dict()
    _summary(progress, f"read {len(files)} file(s), {st['documents']} documents, {st['tokens']} tokens")
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    for k, v in st.items():
        if k == "length_percentiles":
            v = "  ".join(f"{q}={n}" for q, n in v.items())
        print(f"{k:>20}: {v}")
    return 0


def _mixture_stats(cfg, args) -> int:
    """Per source of a `datasets` mixture: its data, its share, and how often the planned run reads it."""
    from tokentrain.data.dataset import build_mixture, planned_counts
    from tokentrain.errors import ConfigError
    from tokentrain.training.schedule import planned_steps

    if args.world_size < 1:
        raise ConfigError(f"--world-size must be >= 1, got {args.world_size}")
    mix = build_mixture(cfg)
    per_rank = cfg.batch_size * cfg.accumulative_counts
    spe = (len(mix) // args.world_size) // per_rank
    if spe == 0:
        raise ConfigError(f"{args.config}: fewer samples ({len(mix)}) than one step of the planned global batch")
    steps = planned_steps(cfg.max_iters, cfg.max_epochs, spe)
    rows = mix.describe(planned_counts(mix, steps, spe, per_rank * args.world_size))
    for r in rows:
        r["tokens"] = int(mix.datasets[mix.names.index(r["name"])].index.num_tokens)
    out = {"planned_steps": steps, "global_batch": per_rank * args.world_size, "mixture_samples": len(mix)}
    if args.json:
        print(json.dumps({**out, "sources": rows}, indent=2))
        return 0
    print("  ".join(f"{k} {v}" for k, v in out.items()))
    print(f"{'source':>16} {'weight':>7} {'tokens':>14} {'samples':>10} {'planned':>10} {'epochs':>8}")
    for r in rows:
        flag = "  over-sampled" if r["epochs"] > 1 else ""
        print(
            f"{r['name']:>16} {r['weight']:>7.4f} {r['tokens']:>14} {r['samples']:>10} {r['planned_samples']:>10} "
            f"{r['epochs']:>8.3f}{flag}"
        )
    return 0


def cmd_show(args) -> int:
    from tokentrain.data.dataset import DataSettings, build_dataset
    from tokentrain.errors import ConfigError

    _options(args)
    if args.config:
        ds = _dataset_of_config(args)
        return _print_sample(ds, args, limit=None if getattr(ds, "names", None) else len(ds))
    if args.folder is None or args.max_length is None:
        raise ConfigError("data show: give DIR and --max-length, or --config CFG")
    if args.max_length <= 0:
        raise ConfigError(f"--max-length must be positive, got {args.max_length}")
    ds = build_dataset(
        DataSettings(
            folder=args.folder,
            max_length=args.max_length,
            pack_to_max_length=not args.unpacked,
            shuffle=not args.no_shuffle,
            seed=args.seed,
            min_length=args.min_length,
            file_type=args.file_type,
            data_order_path=args.data_order,
            zero_is_target=args.zero_is_target,
        )
    )
    return _print_sample(ds, args, len(ds))


def _options(args) -> list[str]:
    """--cfg-options, which only a config can take (refused without one, not ignored)."""
    from tokentrain.errors import ConfigError

    if args.cfg_options and not args.config:
        raise ConfigError("--cfg-options needs --config CFG (the options override that config's settings)")
    return args.cfg_options


def _dataset_of_config(args):
    """The training dataset a config describes (command-line data options override it)."""
    from tokentrain.config.loader import load_config
    from tokentrain.data.dataset import build_dataset, build_mixture, settings_for

    cfg = load_config(args.config, _options(args))
    changes = {"max_length": args.max_length} if args.max_length else {}
    if args.no_shuffle:
        changes["shuffle_before_pack"] = False
    if args.unpacked:
        changes["pack_to_max_length"] = False
    cfg = cfg.replace(**changes)
    return build_mixture(cfg) if cfg.datasets else build_dataset(settings_for(cfg, cfg.dataset_folder))


def _print_sample(ds, args, limit: int | None) -> int:
    from tokentrain.errors import ConfigError

    if args.index < 0 or (limit is not None and args.index >= limit):
        raise ConfigError(f"--index {args.index} out of range: the dataset has {len(ds)} samples")
    s = ds[args.index]
    sources = [{"file": f, "line": n} for f, n in ds.sources(args.index)]
    if args.json or not args.tokenizer:
        out = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in s.items()}
        out["num_samples"], out["sources"] = len(ds), sources
        print(json.dumps(out) if args.json else json.dumps(out, indent=1))
        return 0
    print(_readable(s, sources, args.tokenizer))
    return 0


def _readable(s: dict, sources: list[dict], tokenizer_path: str) -> str:
    """Each fragment decoded; spans not trained in this sample shown inside [MASKED ...]."""
    from transformers import AutoTokenizer

    from tokentrain.model.source import check_model_source

    check_model_source(tokenizer_path, "--tokenizer", need_config=False)
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    ids, labels, cu = s["input_ids"], s["labels"], s["cu_seqlens"]
    trained = [False] + [bool(labels[i - 1] != -100) for i in range(1, len(ids))]
    out = []
    for j in range(len(cu) - 1):
        a, b = int(cu[j]), int(cu[j + 1])
        src = sources[j] if j < len(sources) else {}
        out.append(f"--- fragment {j}: tokens {a}..{b} from {src.get('file')}:{src.get('line')}")
        spans: list[tuple[bool | None, list[int]]] = []
        cur: list[int] = []
        flag: bool | None = None
        for i in range(a, b):
            t = trained[i] and i > a
            if flag is not None and t != flag:
                spans.append((flag, cur))
                cur = []
            cur.append(int(ids[i]))
            flag = t
        spans.append((flag, cur))
        # transformers' stub says decode() may give a list; a list of ids decodes to one str
        out.append("".join(tok.decode(c) if f else f"[MASKED {tok.decode(c)!r}]" for f, c in spans))  # type: ignore[misc]
    return "\n".join(out)


def cmd_check(args) -> int:
    """Format problems of every file, then (with a model) ids over its vocabulary and a
    dataset with no target; notes on documents without targets and over max_length.
    Files read before and unchanged since are not read again (data/summary.py)."""
    from tokentrain.data import corpus_check as cc
    from tokentrain.errors import ConfigError

    workers = cc.default_workers() if args.workers is None else args.workers
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    sets, limits = _check_targets(args)
    files = [p for _, fs in sets for p in fs]
    progress = _progress(files, "check")
    sums, stored = cc.summarize(files, workers, progress)
    problems = cc.all_problems(files, sums)
    notes: list[str] = []
    start = 0
    for where, fs in sets:
        found, said = cc.model_problems(where, fs, sums[start : start + len(fs)], limits)
        problems += found
        notes += [f"{where}: {n}" for n in said]
        start += len(fs)
    for p in problems:
        print(p)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    against = f" against {limits.model} (vocabulary {limits.vocab_size})" if limits.vocab_size else ""
    _summary(
        progress,
        f"checked {len(files)} file(s){against}: {len(problems)} problem(s) ({stored} unchanged since "
        f"summarised, the rest read with {workers} worker(s))",
    )
    return 1 if problems else 0


def _check_targets(args):
    """([(name, files) per dataset], Limits) from DIR / --model / --max-length or --config."""
    from tokentrain.data import corpus_check as cc
    from tokentrain.data.format import discover_files
    from tokentrain.errors import ConfigError

    if args.config:
        from tokentrain.config.loader import load_config
        from tokentrain.data.mixture import parse_sources

        if args.folder or args.model:
            raise ConfigError("data check: give --config CFG alone, or DIR (with --model MODEL)")
        cfg = load_config(args.config)
        named = [("dataset_folder", cfg.dataset_folder)] if cfg.dataset_folder else []
        if cfg.datasets:
            named = [(f"datasets {s.name!r}", s.folder) for s in parse_sources(cfg.datasets)]
        if cfg.val_dataset_folder:
            named.append(("val_dataset_folder", cfg.val_dataset_folder))
        sets = [
            (f"{key} = {folder!r}", discover_files(folder, cfg.file_type, cfg.data_order_path)) for key, folder in named
        ]
        model = cfg.pretrained_model_name_or_path
        from tokentrain.model.source import check_model_source

        check_model_source(model)  # a hub id without network: one line, not a minute of retries
        limits = cc.Limits(
            cc.vocab_size_of(model, cfg.trust_remote_code),
            args.max_length or cfg.max_length,
            cfg.pack_to_max_length,
            cfg.zero_is_target,
            model,
        )
        return sets, limits
    if not args.folder:
        raise ConfigError("data check: give a dataset folder DIR, or --config CFG")
    if args.max_length is not None and args.max_length <= 0:
        raise ConfigError(f"--max-length must be positive, got {args.max_length}")
    if args.model and not Path(args.model, "config.json").is_file():
        raise ConfigError(f"--model {args.model}: no config.json there; give the model's folder")
    vocab = cc.vocab_size_of(args.model) if args.model else None
    return [(args.folder, _files(args))], cc.Limits(vocab, args.max_length, model=args.model or "")


def cmd_index(args) -> int:
    import logging

    from tokentrain.data import format as fmt
    from tokentrain.data.index import _cached_meta_path
    from tokentrain.data.summary import index_file, remember
    from tokentrain.errors import DataError

    built = 0
    files = _files(args)
    progress = _progress(files, "index")
    for p in files:
        mp = fmt.meta_path(p)
        if p.stat().st_size == 0 or (mp.exists() and not args.rebuild):
            progress.update(p.stat().st_size)
            continue
        meta, summary = index_file(p)
        try:
            fmt.save_meta(meta, mp)
            remember(p, mp, summary)
        except OSError as e:
            if mp.exists():  # a stale meta we cannot replace would keep winning over a cached one
                raise DataError(f"{mp}: cannot rewrite the meta ({e.strerror}); make the folder writable") from None
            mp = _cached_meta_path(p)  # read-only folder: where training looks next (as ensure_meta does)
            mp.parent.mkdir(parents=True, exist_ok=True)
            fmt.save_meta(meta, mp)
        built += 1
        logging.getLogger("tokentrain").debug("%s: %d lines", mp, len(meta))
        progress.update(p.stat().st_size, len(meta))
    _summary(progress, f"indexed {len(files)} file(s)")
    print(f"wrote {built} meta file(s)")
    return 0


def cmd_order(args) -> int:
    from tokentrain.data.format import relative_order
    from tokentrain.utils.atomic import atomic_file

    rel = relative_order(args.data_folder, args.file_type)
    out = Path(args.save_folder)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "data_order.txt", "w") as f:
        f.write("".join(r + "\n" for r in rel))
    print(f"wrote {out / 'data_order.txt'} ({len(rel)} files)")
    return 0


def cmd_synth(args) -> int:
    from tokentrain.data.synth import synth_dataset

    paths = synth_dataset(args.out, args.files, args.documents, args.seed, args.mean_length, args.vocab_size)
    print(f"wrote {len(paths)} file(s) with {args.documents} documents to {args.out}")
    return 0
