"""`tokentrain convert pth_to_hf CFG CKPT_DIR OUT_DIR`: checkpoint -> Hugging Face folder.

Always safetensors: xtuner's `--safe-serialization` is accepted (it is what happens) and
`--no-safe-serialization` is a usage error (transformers 5 saves only safetensors).
`--dtype` is both the tensors' dtype and the "dtype" recorded in config.json."""

from __future__ import annotations

import argparse

from tokentrain.utils.dtypes import DTYPE_NAMES
from tokentrain.utils.paths import shown


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
        action=argparse.BooleanOptionalAction,
        default=True,
        help="safetensors: the default and the only format (accepted for xtuner scripts; "
        "--no-safe-serialization is refused: transformers 5 writes only safetensors)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace OUT_DIR when it holds anything (never when it is, holds or lies inside the checkpoints)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=[*DTYPE_NAMES, "auto"],
        help="dtype of the saved weights (default float32: exactly the trained weights)",
    )
    p.set_defaults(func=cmd_pth_to_hf)


def cmd_pth_to_hf(args) -> int:
    from pathlib import Path

    from tokentrain.checkpoint.convert import check_out, named_as_given, pth_to_hf
    from tokentrain.checkpoint.safety import weights_only_everywhere
    from tokentrain.cli.train_cmd import quiet_libraries
    from tokentrain.config.loader import load_config
    from tokentrain.errors import ConfigError

    weights_only_everywhere()  # DeepSpeed's and DCP's loaders too: no code from a checkpoint
    cfg = load_config(args.config, [])
    if not args.safe_serialization:
        raise ConfigError(
            "--no-safe-serialization: not supported; the model is written as safetensors (transformers 5)"
        )
    ckpt = Path(args.checkpoint)
    if not ckpt.exists():
        raise ConfigError(f"{shown(ckpt)}: no such folder; give a step_N folder, a checkpoints folder or a work dir")
    check_out(Path(args.out), args.force)  # before anything heavy
    from tokentrain.model.source import check_model_source

    check_model_source(cfg.pretrained_model_name_or_path)
    quiet_libraries()
    with named_as_given(ckpt):
        out = pth_to_hf(
            cfg.pretrained_model_name_or_path,
            ckpt,
            Path(args.out),
            cfg.trust_remote_code,
            args.max_shard_size,
            args.dtype,
            args.force,
        )
    print(f"wrote {out}")
    return 0
