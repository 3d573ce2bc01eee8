"""The final Hugging Face folder `WORK_DIR/hf`: safetensors + config + tokenizer.

Written aside and swapped into place, so `WORK_DIR/hf` is always a loadable model (the
previous export or the new one). Exported in `export_dtype` (default float32: the
trained master weights exactly, so the folder reproduces the trainer's logits).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from tokentrain.errors import TokentrainError
from tokentrain.utils.atomic import make_temp_dir, with_umask
from tokentrain.utils.disk import disk_full
from tokentrain.utils.dtypes import DTYPE_NAMES, torch_dtype


def export_hf(model, tokenizer, out: Path, export_dtype: str = "float32", max_shard_size: str = "5GB") -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(f".{out.name}.", out.parent)  # umask permissions, not mkdtemp's 0700
    try:
        if export_dtype in DTYPE_NAMES:
            dtype = torch_dtype(export_dtype)
        else:  # "auto": the dtype the model was published in
            dtype = getattr(model.config, "dtype", None) or torch.float32
            if isinstance(dtype, str):
                dtype = torch_dtype(dtype) if dtype in DTYPE_NAMES else torch.float32
        state = {
            k: v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()
            for k, v in model.state_dict().items()
        }
        use_cache, saved_dtype = model.config.use_cache, getattr(model.config, "dtype", None)
        model.config.use_cache = True  # generation-ready
        model.config.dtype = dtype  # what the weights are stored in, so dtype="auto" loads them as they are
        try:
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True, max_shard_size=max_shard_size)
        finally:
            model.config.use_cache, model.config.dtype = use_cache, saved_dtype
        _record_dtype(tmp / "config.json", dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for p in tmp.rglob("*"):  # safetensors writes 0600: readable by colleagues like any output
            with_umask(p, folder=p.is_dir())
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and disk_full(e, out.parent):
            raise TokentrainError(
                f"cannot write the Hugging Face export {out}: no space left on device; the checkpoints are intact: "
                "free space, then export the last one with `tokentrain convert pth_to_hf CFG WORK_DIR OUT`"
            ) from e
        raise
    return out


def _record_dtype(config_json: Path, dtype: torch.dtype) -> None:
    """config.json names the dtype the tensors are stored in (save_pretrained writes the
    in-memory model's, float32, even for bf16 tensors)."""
    import json

    cfg = json.loads(config_json.read_text())
    name = str(dtype).removeprefix("torch.")
    cfg["dtype"] = name
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = name
    config_json.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
