"""DeepSpeed configs (engine `deepspeed`): shipped presets by name, or a user's JSON; "auto" values filled from ours.

Presets live in ``tokentrain/configs/deepspeed/<name>.json``. "auto" keys are resolved from
the training config so there is one source of truth for micro batch, accumulation,
clipping and precision; a user's explicit value is kept but must agree with ours where
the trainer relies on it (batch shape and accumulation), else a one-line error.
"""

from __future__ import annotations

import copy
import difflib
import json
from importlib import resources
from pathlib import Path

from tokentrain.errors import ConfigError


def preset_names() -> list[str]:
    folder = resources.files("tokentrain.configs") / "deepspeed"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_deepspeed_config(name_or_path: str) -> dict:
    """A preset name (``deepspeed_zero1`` ...) or a path to a JSON file."""
    path = Path(name_or_path)
    if name_or_path.endswith(".json") or path.is_file():
        try:
            return json.loads(path.read_text())
        except OSError as e:
            raise ConfigError(f"--deepspeed {name_or_path}: cannot read ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"--deepspeed {name_or_path}: not valid JSON ({e})") from None
    names = preset_names()
    if name_or_path not in names:
        close = difflib.get_close_matches(name_or_path, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"--deepspeed {name_or_path!r}: unknown preset{hint} Presets: {', '.join(names)}; or pass a path "
            "to a JSON file"
        )
    text = (resources.files("tokentrain.configs") / "deepspeed" / f"{name_or_path}.json").read_text()
    return json.loads(text)


def _set(d: dict, key: str, value, *, must_match: bool = False, what: str = "") -> None:
    cur = d.get(key, "auto")
    if cur == "auto":
        d[key] = value
    elif must_match and cur != value:
        raise ConfigError(
            f"DeepSpeed config sets {key}={cur!r} but the training config has {what}={value!r}; set it to "
            "\"auto\" or make them agree"
        )


def fill_auto(
    ds: dict,
    *,
    micro_batch_size: int,
    accumulation: int,
    world_size: int,
    max_norm: float,
    dtype: str,
    hidden_size: int | None = None,
) -> dict:
    """Resolve "auto" values. `dtype` is the dtype DeepSpeed holds the module's parameters in:
    "float32", "bfloat16" or "float16" (its fp32 masters are in the optimizer)."""
    ds = copy.deepcopy(ds)
    _set(ds, "train_micro_batch_size_per_gpu", micro_batch_size, must_match=True, what="batch_size")
    _set(ds, "gradient_accumulation_steps", accumulation, must_match=True, what="accumulative_counts")
    if ds.get("train_batch_size", "auto") == "auto":
        ds["train_batch_size"] = micro_batch_size * accumulation * world_size
    elif ds["train_batch_size"] != micro_batch_size * accumulation * world_size:
        raise ConfigError(
            f"DeepSpeed train_batch_size={ds['train_batch_size']} != batch_size*accumulative_counts*world_size="
            f"{micro_batch_size * accumulation * world_size}; set it to \"auto\""
        )
    _set(ds, "gradient_clipping", float(max_norm) if max_norm else 0.0)
    for key, on in (("bf16", dtype == "bfloat16"), ("fp16", dtype == "float16")):
        section = ds.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = on
    if dtype == "bfloat16":  # DeepSpeed would all-reduce bf16 gradients; fp16 keeps its default
        _set(ds, "communication_data_type", "fp32")
    zero = ds.get("zero_optimization", {})
    h = hidden_size or 1024
    for key, value in (
        ("reduce_bucket_size", h * h),
        ("stage3_prefetch_bucket_size", int(0.9 * h * h)),
        ("stage3_param_persistence_threshold", 10 * h),
    ):
        if zero.get(key) == "auto":
            zero[key] = value
    leftovers = [k for k, v in _walk(ds) if v == "auto"]
    if leftovers:
        raise ConfigError(f"DeepSpeed config: cannot resolve \"auto\" for {', '.join(leftovers)}; give explicit values")
    return ds


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def resolve_for_run(ds: dict, cfg, env, compute) -> dict:
    """The DeepSpeed config of this run: "auto" values from the training config, the world
    size, the dtype DeepSpeed holds the parameters in (`compute`: the compute dtype with
    mixed_precision 'params'; None: fp32) and the model's hidden size (read from its config.json)."""
    import torch
    from transformers import AutoConfig

    path, remote = cfg.pretrained_model_name_or_path, cfg.trust_remote_code
    model_config = AutoConfig.from_pretrained(path, trust_remote_code=remote)
    return fill_auto(
        ds,
        micro_batch_size=cfg.batch_size,
        accumulation=cfg.accumulative_counts,
        world_size=env.world_size,
        max_norm=cfg.max_norm,
        dtype=str(compute or torch.float32).replace("torch.", ""),
        hidden_size=getattr(model_config, "hidden_size", None),
    )
