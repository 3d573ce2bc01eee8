"""`tokentrain convert pth_to_hf CFG CKPT_DIR OUT_DIR`: checkpoint -> Hugging Face folder."""

from __future__ import annotations


def register(sub, common) -> None:
    conv = sub.add_parser("convert", help="convert checkpoints (pth_to_hf)", parents=[common])
    csub = conv.add_subparsers(dest="convert_command", metavar="KIND", required=True, parser_class=type(conv))
    p = csub.add_parser(
        "pth_to_hf",
        help="a training checkpoint (plain or DeepSpeed, any ZeRO stage) -> HF model folder",
        parents=[common],
    )
    p.add_argument("config", metavar="CFG", help="the training config (names the model's config and tokenizer)")
    p.add_argument(
        "checkpoint", metavar="CKPT_DIR", help="a step_N folder, a checkpoints folder or a work dir (newest complete)"
    )
    p.add_argument("out", metavar="OUT_DIR")
    p.add_argument(
        "--safe-serialization",
        action="store_true",
        default=True,
        help="write safetensors (the default; accepted for xtuner compatibility)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16", "auto"],
        help="dtype of the saved weights (default float32: exactly the trained weights)",
    )
    p.set_defaults(func=cmd_pth_to_hf)


def cmd_pth_to_hf(args) -> int:
    from pathlib import Path

    from tokentrain.checkpoint.convert import pth_to_hf
    from tokentrain.cli.train_cmd import quiet_libraries
    from tokentrain.config.loader import load_config

    cfg = load_config(args.config, [])
    quiet_libraries()
    out = pth_to_hf(
        cfg.pretrained_model_name_or_path,
        Path(args.checkpoint),
        Path(args.out),
        cfg.trust_remote_code,
        args.max_shard_size,
        args.dtype,
    )
    print(f"wrote {out}")
    return 0
