"""The trained model, loaded to talk to (`tokentrain generate` / `chat`): from an exported folder
(`WORK_DIR/hf`), a work dir (its `hf/`, else its newest checkpoint), a checkpoint (converted in
memory, as `convert pth_to_hf` reads it), or a hub id. Weights only: no code from the folder
unless asked (``--trust-remote-code``); a checkpoint is checked as `--resume` checks it, and
torch loads weights-only (checkpoint/safety.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tokentrain.errors import ConfigError, first_line

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    path: str  # the HF folder or hub id to load; with `checkpoint`, the model the run started from
    checkpoint: Path | None = None  # a training checkpoint whose weights replace the model's


def find_model(arg: str) -> ModelSource:
    """What DIR names: a folder with a config.json, else its `hf/` export, else a training
    checkpoint (a step_N, a checkpoints folder, a work dir: the newest complete one, checked as
    `--resume` checks it) on the model its run started from. One ConfigError line for anything
    else, naming what to give instead."""
    from tokentrain.model.source import check_model_source

    p = Path(arg).expanduser()
    if not p.exists():
        check_model_source(arg, "DIR")  # a hub id that can be had now, else one line
        return ModelSource(arg)
    if not p.is_dir():
        raise ConfigError(f"{arg}: not a folder; give an exported model folder (WORK_DIR/hf) or a work dir")
    from tokentrain.checkpoint.manager import is_complete, step_of
    from tokentrain.model.lm import has_weights

    if is_complete(p) or step_of(p) is not None:  # its config.json is the run's, not a model's
        return _checkpoint(arg, p)
    found = next((d for d in (p, p / "hf") if (d / "config.json").is_file()), None)
    if found is None:
        if p.name == "checkpoints" or (p / "checkpoints").is_dir():
            return _checkpoint(arg, p)
        raise ConfigError(
            f"{arg}: no model here (no config.json, no hf/ folder, no checkpoints); give an exported model "
            "folder (WORK_DIR/hf) or a work dir"
        )
    if not has_weights(str(found)):
        raise ConfigError(
            f"{found}: a config.json but no weights (a model to train from scratch); give a trained model: "
            "WORK_DIR/hf after `tokentrain train`"
        )
    if found != p:
        log.info("%s: loading its export %s", arg, found)
    return ModelSource(str(found))


def _checkpoint(arg: str, p: Path) -> ModelSource:
    import json

    from tokentrain.checkpoint.convert import find_checkpoint, named_as_given
    from tokentrain.model.source import check_model_source

    with named_as_given(p):
        ckpt = find_checkpoint(p)
    try:
        base = json.loads((ckpt / "config.json").read_text()).get("pretrained_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    if not isinstance(base, str) or not base:
        raise ConfigError(
            f"{ckpt}: no pretrained_model_name_or_path in its config.json (the run's config); export it first: "
            f"tokentrain convert pth_to_hf CFG {arg} OUT_DIR, then give OUT_DIR"
        )
    check_model_source(base, f"{ckpt / 'config.json'}: pretrained_model_name_or_path")
    log.info(
        "%s: checkpoint %s on the model %s, converted in memory (`convert pth_to_hf` saves it)", arg, ckpt.name, base
    )
    return ModelSource(base, ckpt)


def pick_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible here; use --device cpu (or auto)")
    return torch.device(name)


def load_for_inference(source: ModelSource, device: torch.device, dtype_name: str, trust_remote_code: bool = False):
    """(model in eval mode on `device`, tokenizer). `dtype_name` as training's `dtype`: 'auto' is
    bf16 on a GPU that has it, fp32 on CPU (model/lm.autocast_dtype); the weights are held in it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tokentrain.model.lm import autocast_dtype, load_tokenizer, running_attention

    dtype = autocast_dtype(dtype_name, device) or torch.float32
    path = source.path
    tokenizer = load_tokenizer(path, trust_remote_code, named=path)
    if source.checkpoint is not None:
        from tokentrain.checkpoint.convert import model_from_checkpoint

        model = model_from_checkpoint(path, source.checkpoint, trust_remote_code, to_run=True)[0]
        model.to(device, dtype)
        model.eval()
        return model, tokenizer
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, trust_remote_code=trust_remote_code, **running_attention(config)
        )
    except Exception as e:
        raise ConfigError(f"{path}: cannot load the model: {first_line(e)}") from None
    model.to(device)  # type: ignore[arg-type]  # transformers' decorator stub drops `self`
    model.eval()
    return model, tokenizer
