"""`tokentrain convert pth_to_hf`: a training checkpoint -> a Hugging Face model folder.

Works on any checkpoint this trainer writes: plain (``model.safetensors``) or DeepSpeed of
any ZeRO stage (``ds/``, consolidated to fp32 on the CPU from the partition files with
DeepSpeed's own reader -- no process group, no GPU). The model is built once, on the
meta device from the config, and the weights are assigned into it; the training data is
not needed. The output (sharded safetensors + config + tokenizer) is written aside and
renamed into place.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tokentrain.errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "model."  # the trainer's CausalLMWithLoss holds the HF model as `.model`


def find_checkpoint(path: Path) -> Path:
    from tokentrain.checkpoint.manager import resolve_resume

    found = resolve_resume(str(path), path)
    if found is None:
        raise ConfigError(f"{path}: no checkpoint found; give a step_N folder or a work dir")
    return found


def load_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    from tokentrain.engine.strategy import MODEL_FILE
    from tokentrain.engines.fsdp2_checkpoint import is_fsdp_checkpoint, read_full_state_dict

    if is_fsdp_checkpoint(ckpt):  # FSDP2: DCP shards of any world size, read whole on the CPU
        return read_full_state_dict(ckpt)
    if (ckpt / MODEL_FILE).is_file():
        from safetensors.torch import load_file

        return load_file(str(ckpt / MODEL_FILE))
    from tokentrain.distributed.deepspeed_strategy import DS_TAG

    if (ckpt / DS_TAG).is_dir():
        import os

        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DS_TAG)
        return {k[len(PREFIX) :] if k.startswith(PREFIX) else k: v for k, v in state.items()}
    raise ConfigError(
        f"{ckpt}: neither {MODEL_FILE} nor a DeepSpeed {DS_TAG}/ folder; is this a tokentrain checkpoint?"
    )


def pth_to_hf(
    model_path: str,
    ckpt_dir: Path,
    out: Path,
    trust_remote_code: bool = False,
    max_shard_size: str = "5GB",
    dtype: str = "float32",
) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tokentrain.checkpoint.hf_export import export_hf

    ckpt = find_checkpoint(Path(ckpt_dir))
    state = load_state_dict(ckpt)
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    expected = set(model.state_dict())
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
    log.info("converting %s (%d tensors) -> %s", ckpt, len(state), out)
    return export_hf(model, tokenizer, Path(out), dtype, max_shard_size=max_shard_size)
