"""The trained model, loaded to talk to (`tokentrain generate` / `chat`): from an exported folder
(`WORK_DIR/hf`), a work dir (its `hf/`), or a hub id; a training checkpoint is pointed to
`tokentrain convert pth_to_hf`. Weights only: no code from the folder unless asked
(``--trust-remote-code``), and torch loads weights-only (checkpoint/safety.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tokentrain.errors import ConfigError, first_line

log = logging.getLogger(__name__)


def find_model_dir(arg: str) -> str:
    """The folder (or hub id) to load for DIR: a folder with a config.json, else its `hf/`; one
    ConfigError line for anything else, naming what to give instead."""
    from tokentrain.checkpoint.manager import is_complete, step_of
    from tokentrain.model.lm import has_weights
    from tokentrain.model.source import check_model_source

    p = Path(arg).expanduser()
    if not p.exists():
        check_model_source(arg, "DIR")  # a hub id that can be had now, else one line
        return arg
    if not p.is_dir():
        raise ConfigError(f"{arg}: not a folder; give an exported model folder (WORK_DIR/hf) or a work dir")
    found = next((d for d in (p, p / "hf") if (d / "config.json").is_file()), None)
    if found is None:
        if is_complete(p) or step_of(p) is not None or p.name == "checkpoints" or (p / "checkpoints").is_dir():
            raise ConfigError(
                f"{arg}: training checkpoints, not a model folder (no hf/ export here); export one first: "
                f"tokentrain convert pth_to_hf CFG {arg} OUT_DIR, then give OUT_DIR"
            )
        raise ConfigError(
            f"{arg}: no model here (no config.json, no hf/ folder); give an exported model folder (WORK_DIR/hf) "
            "or a work dir"
        )
    if not has_weights(str(found)):
        raise ConfigError(
            f"{found}: a config.json but no weights (a model to train from scratch); give a trained model: "
            "WORK_DIR/hf after `tokentrain train`"
        )
    if found != p:
        log.info("%s: loading its export %s", arg, found)
    return str(found)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible here; use --device cpu (or auto)")
    return torch.device(name)


def load_for_inference(path: str, device: torch.device, dtype_name: str, trust_remote_code: bool = False):
    """(model in eval mode on `device`, tokenizer). `dtype_name` as training's `dtype`: 'auto' is
    bf16 on a GPU that has it, fp32 on CPU (model/lm.autocast_dtype); the weights are held in it."""
    from transformers import AutoModelForCausalLM

    from tokentrain.checkpoint.safety import weights_only_everywhere
    from tokentrain.model.lm import autocast_dtype, load_tokenizer

    weights_only_everywhere()  # a pytorch_model.bin is read weights-only, whoever loads it
    dtype = autocast_dtype(dtype_name, device) or torch.float32
    tokenizer = load_tokenizer(path, trust_remote_code, named=path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ConfigError(f"{path}: cannot load the model: {first_line(e)}") from None
    model.to(device)  # type: ignore[arg-type]  # transformers' decorator stub drops `self`
    model.eval()
    return model, tokenizer
