"""`tokentrain convert pth_to_hf`: a training checkpoint -> a Hugging Face model folder.

Works on any checkpoint this trainer writes: the engine registry names the engine whose
format the folder holds, and that engine's reader returns the fp32 state dict on the CPU
(no process group, no GPU). The checkpoint's `.pt` files are checked first: nothing in
them is unpickled as code (checkpoint/safety.py). The model is built once, on the
meta device from the config, and the weights are assigned into it; the training data is
not needed. The output (sharded safetensors + config + tokenizer) is written aside and
renamed into place.

Nothing is deleted that the user did not name: an output folder that holds anything is
refused without ``--force`` (checked before the checkpoint is read), and one that is, holds
or lies inside the checkpoints being converted is refused even with it.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from tokentrain.errors import ConfigError, TokentrainError

log = logging.getLogger(__name__)


def _fill_shared(model, state: dict) -> None:
    """Names that share one parameter in the model (tied input/output embeddings) get the
    tensor of whichever of them the checkpoint kept (writers store a shared tensor once)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    for names in groups.values():
        present = [n for n in names if n in state]
        for n in names:
            if present and n not in state:
                state[n] = state[present[0]]


def find_checkpoint(path: Path) -> Path:
    from tokentrain.checkpoint.manager import resolve_resume

    found = resolve_resume(str(path), path)
    if found is None:
        raise ConfigError(f"{path}: no checkpoint found; give a step_N folder or a work dir")
    return found


@contextlib.contextmanager
def named_as_given(ckpt: Path):
    """The checkpoint finder speaks of training's --resume; a command given CKPT_DIR speaks of it."""
    try:
        yield
    except TokentrainError as e:
        prefix = f"--resume {ckpt}: "
        if not str(e).startswith(prefix):
            raise
        text = (
            str(e)[len(prefix) :]
            .replace(", a work dir, or 'auto'", " or a work dir")
            .replace("use another one or --resume auto", "give another one")
        )
        raise type(e)(f"{ckpt}: {text}") from None


def check_out(out: Path, force: bool) -> None:
    """Refuse an output path that is a file, or a folder holding anything (without --force)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"OUT_DIR {out}: exists and is not a folder; give a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(
            f"OUT_DIR {out}: not empty; it would be replaced by the export: give a new or empty folder, "
            "or --force to replace it"
        )


def check_not_over(out: Path, ckpt: Path) -> None:
    """Refuse (even with --force) an output that is, holds or lies inside the checkpoints."""
    target, folder = out.resolve(), ckpt.resolve()
    for p in (folder, folder.parent) if folder.parent.name == "checkpoints" else (folder,):
        if target == p or p.is_relative_to(target) or target.is_relative_to(p):
            raise ConfigError(
                f"OUT_DIR {out}: {'is' if target == p else 'holds' if p.is_relative_to(target) else 'lies inside'} "
                f"the checkpoints being converted ({p}); replacing it would delete them: give another folder"
            )


def pth_to_hf(
    model_path: str,
    ckpt_dir: Path,
    out: Path,
    trust_remote_code: bool = False,
    max_shard_size: str = "5GB",
    dtype: str = "float32",
    force: bool = False,
) -> Path:
    from tokentrain.checkpoint.hf_export import export_hf

    check_out(Path(out), force)
    ckpt = find_checkpoint(Path(ckpt_dir))
    check_not_over(Path(out), ckpt)
    model, tokenizer = model_from_checkpoint(model_path, ckpt, trust_remote_code)
    log.info("converting %s (%d tensors) -> %s", ckpt, len(model.state_dict()), out)
    return export_hf(model, tokenizer, Path(out), dtype, max_shard_size=max_shard_size)


def model_from_checkpoint(model_path: str, ckpt: Path, trust_remote_code: bool = False, to_run: bool = False):
    """(the fp32 HF model on the CPU, its tokenizer or None) from a checked checkpoint folder and
    the model folder the run started from (its config and tokenizer). Built on the meta device,
    enough to save it; `to_run`: built on the CPU uninitialised instead, so the buffers no
    checkpoint holds (rotary tables) are computed and the model can run."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tokentrain.engines.registry import read_model_state
    from tokentrain.model.init import no_init_weights
    from tokentrain.model.lm import running_attention

    state = read_model_state(ckpt)  # the engine that wrote it reads it; its files were checked first
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    attention = running_attention(config) if to_run else {}
    with no_init_weights() if to_run else torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, trust_remote_code=trust_remote_code, **attention
        )
    expected = set(model.state_dict())
    _fill_shared(model, state)
    tied = {k for k in expected - set(state) if getattr(config, "tie_word_embeddings", False) and "lm_head" in k}
    missing = expected - set(state) - tied
    unexpected = set(state) - expected
    if missing or unexpected:
        raise ConfigError(
            f"{ckpt}: weights do not fit the model of {model_path} "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); is it the same model?"
        )
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except Exception as e:  # a model folder without a tokenizer is still convertible
        log.warning("no tokenizer saved: cannot load one from %s (%s)", model_path, e)
    return model, tokenizer
