"""Python config file (+ `--cfg-options key=value`) -> one validated `TrainConfig`.

Everything is checked before any heavy import or I/O: an unknown key (with "did you
mean"), a value of the wrong type, or an impossible value is a `ConfigError` whose one
line names the file and the key.

What counts as a setting: every module-level name not starting with ``_`` that is not a
module, class or function (so ``import torch`` or a helper function in a config is fine).
"""

from __future__ import annotations

import ast
import difflib
import os
import runpy
import types
import typing
from pathlib import Path

from tokentrain.config.schema import DTYPE_ALIASES, FIELDS, TrainConfig, check_values
from tokentrain.errors import ConfigError
from tokentrain.utils.paths import shown

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "True or False"}


# Names other trainers (HF Trainer, xtuner, Megatron) give to our settings.
ALIASES = {
    "learning_rate": "lr",
    "max_steps": "max_iters",
    "train_iters": "max_iters",
    "num_train_epochs": "max_epochs",
    "epochs": "max_epochs",
    "gradient_accumulation_steps": "accumulative_counts",
    "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size",
    "max_seq_length": "max_length",
    "seq_length": "max_length",
    "warmup_ratio": "warm_up_ratio",
    "max_grad_norm": "max_norm",
    "clip_grad": "max_norm",
    "model_name_or_path": "pretrained_model_name_or_path",
    "output_dir": "work_dir",
    "logging_steps": "log_interval",
    "eval_steps": "evaluation_freq",
    "save_interval": "save_steps",
    "dataset": "dataset_folder",
    "data_path": "dataset_folder",
}


_ADAMW = "tokentrain always uses AdamW: set lr, betas, weight_decay, max_norm"
_SCHEDULE = "the schedule is always linear warm-up then cosine: set warm_up_ratio, min_lr_ratio"
_TEMPLATE = "the chat template is applied when tokenizing: `tokentrain tokenize --chat-template`"
_DATA = "set dataset_folder (or datasets = [...]), batch_size, dataloader_num_workers"
_MODEL = "set pretrained_model_name_or_path to an HF folder or hub id (full fine-tuning)"

# XTuner (mmengine) keys with no tokentrain key of their own: what tokentrain does instead.
# A key found here gets this sentence, never a fuzzy match: `resume` is not `resume_ignore`.
XTUNER_INSTEAD = {
    "optim_type": _ADAMW,
    "optim_wrapper": _ADAMW,
    "optimizer": _ADAMW,
    "resume": "resume with the `--resume auto` flag of `tokentrain train`, not a config key",
    "load_from": "continue a run with `--resume PATH`, or start from other weights with pretrained_model_name_or_path",
    "param_scheduler": _SCHEDULE,
    "lr_scheduler": _SCHEDULE,
    "prompt_template": _TEMPLATE,
    "dataset_map_fn": _TEMPLATE,
    "template_map_fn": _TEMPLATE,
    "tokenizer": "the tokenizer is read from pretrained_model_name_or_path",
    "model": _MODEL,
    "llm": _MODEL,
    "lora": "tokentrain does full fine-tuning only (no LoRA/QLoRA)",
    "quantization_config": "tokentrain does full fine-tuning only (no LoRA/QLoRA)",
    "sequence_parallel_size": "no sequence parallelism: a rank holds whole samples "
    "(lower max_length, or gradient_checkpointing = True)",
    "train_dataset": _DATA,
    "train_dataloader": _DATA,
    "sampler": _DATA,
    "train_cfg": "set max_epochs or max_iters",
    "default_hooks": "set log_interval, save_steps, save_total_limit",
    "log_processor": "set log_interval",
    "custom_hooks": "sample generation: set evaluation_inputs, evaluation_freq, SYSTEM",
    "visualizer": "set tensorboard = True (the default) or wandb = True",
    "randomness": "set seed",
    "launcher": "the launcher is the `--launcher` flag of `tokentrain train`",
    "env_cfg": "the launcher is the `--launcher` flag of `tokentrain train`",
    "deepspeed": "DeepSpeed is the `--deepspeed PRESET|JSON` flag of `tokentrain train`",
}


# Keys whose None means "not set" (their typed value then): a mixture's config naturally
# writes `dataset_folder = None`.
UNSET_BY_NONE = {"dataset_folder": ""}

_XTUNER_MODULES = ("xtuner", "mmengine", "peft", "bitsandbytes")  # what an XTuner config imports


def hint(key: str) -> str:
    """Why a config key is unknown and what to write instead: another trainer's name for one
    of ours, what tokentrain does in place of an XTuner key, else the closest key."""
    if key in XTUNER_INSTEAD:
        return f" ({XTUNER_INSTEAD[key]})"
    return did_you_mean(key, FIELDS)


def unknown_keys(keys: list[str], where: str) -> ConfigError:
    """One error for every unknown key at once: a migrated config is fixed in one pass."""
    if len(keys) == 1:
        return ConfigError(f"{where}unknown setting {keys[0]!r}{hint(keys[0])}")
    listed = "; ".join(f"{k!r}{hint(k)}" for k in keys)
    return ConfigError(f"{where}{len(keys)} unknown settings: {listed}")


def did_you_mean(key: str, choices) -> str:
    if key in ALIASES and ALIASES[key] in choices:
        return f" (did you mean {ALIASES[key]!r}?)"
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    if not close:
        close = [c for c in choices if c.lower() == key.lower()]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        return " or ".join("None" if a is type(None) else _describe(a) for a in args)
    if origin is tuple:
        return f"a tuple of {len(args)} numbers"
    if origin is list:
        return "a list of dicts" if args and args[0] is dict else "a list of strings"
    return _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _field_type(name: str):
    return typing.get_type_hints(TrainConfig)[name]


def check_type(name: str, value, tp=None):
    """Return `value` converted to the field's type, or raise ValueError describing the need."""
    tp = _field_type(name) if tp is None else tp
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return check_type(name, value, a)
            except ValueError:
                pass
        raise ValueError(_describe(tp))
    if origin is tuple:
        if not isinstance(value, (tuple, list)) or len(value) != len(args):
            raise ValueError(_describe(tp))
        return tuple(check_type(name, v, a) for v, a in zip(value, args))
    if origin is list:
        if not isinstance(value, (tuple, list)):
            raise ValueError(_describe(tp))
        return [check_type(name, v, args[0]) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(_describe(tp))
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(_describe(tp))
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(_describe(tp))
    if tp is str:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
        raise ValueError(_describe(tp))
    if tp is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ValueError("a list of dicts")
    raise ValueError(_describe(tp))


def _settings_of(namespace: dict) -> dict:
    """The settings of a config's namespace. An XTuner key stays one even when it holds a class
    (`optim_type = AdamW`): dropping it as an import would silently ignore it."""
    return {
        k: v
        for k, v in namespace.items()
        if not k.startswith("_")
        and not isinstance(v, types.ModuleType)
        and (k in XTUNER_INSTEAD or not isinstance(v, (types.FunctionType, type, types.BuiltinFunctionType)))
    }


def parse_override(text: str) -> tuple[str, object]:
    """`key=value` from the command line; the value is coerced to the key's type."""
    if "=" not in text:
        raise ConfigError(f"--cfg-options {text!r}: expected key=value")
    key, raw = (s.strip() for s in text.split("=", 1))
    if key not in FIELDS:
        raise ConfigError(f"--cfg-options: unknown key {key!r}{hint(key)}")
    return key, coerce_text(key, raw)


def coerce_text(key: str, raw: str):
    tp = _field_type(key)
    args = typing.get_args(tp)
    if raw.lower() in ("none", "null") and (type(None) in args or key in UNSET_BY_NONE):
        return None
    union = bool(args) and typing.get_origin(tp) in (types.UnionType, typing.Union)
    bases = [a for a in args if a is not type(None)] if union else [tp]
    # `bool | str` (compile = 'auto' | True | False): a word that is no boolean is the string
    for base in bases[:-1]:
        try:
            return _coerce_as(key, raw, base)
        except ValueError:
            pass
    try:
        return _coerce_as(key, raw, bases[-1])
    except ValueError:
        raise ConfigError(f"--cfg-options {key}={raw!r}: expected {_describe(tp)}") from None


def _coerce_as(key: str, raw: str, base):
    """`raw` as a value of `base` (one member of the key's type); ValueError when it is none."""
    if base is bool:
        low = raw.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError
    if base is int:
        try:
            return int(raw)
        except ValueError:
            f = float(raw)  # "1e3" -> 1000
            if not f.is_integer():
                raise
            return int(f)
    if base is float:
        return float(raw)
    if base is str:
        try:
            v = ast.literal_eval(raw)
            return v if isinstance(v, str) else raw
        except (ValueError, SyntaxError):
            return raw
    # tuple / list: a Python literal, or comma-separated items
    try:
        v = ast.literal_eval(raw)
        if not isinstance(v, (list, tuple)):
            v = [v]
    except (ValueError, SyntaxError):
        v = [s.strip() for s in raw.split(",") if s.strip()]
        inner = typing.get_args(base)
        if inner and inner[0] is float:
            v = [float(s) for s in v]
    return check_type(key, v)


def build_config(
    settings: dict, source: str, overrides: dict | None = None, origins: dict | None = None
) -> TrainConfig:
    """Validate a mapping of settings (from a file, then overridden) into a TrainConfig.
    ``origins`` names where an override came from (e.g. "--cfg-options"): a bad value is
    blamed there, not on the file."""
    overrides = overrides or {}

    def where(key: str) -> str:
        if key in overrides:
            return (origins or {}).get(key, "--cfg-options")
        return source

    unknown = [k for k in settings if k not in FIELDS]
    if unknown:
        raise unknown_keys(unknown, f"{source}: ")
    values = dict(settings)
    values.update(overrides)
    for key, unset in UNSET_BY_NONE.items():
        if key in values and values[key] is None:
            values[key] = unset
    for key in ("dtype", "export_dtype"):
        if isinstance(values.get(key), str):
            values[key] = DTYPE_ALIASES.get(values[key].lower(), values[key].lower())
    typed = {}
    for key, value in values.items():
        try:
            typed[key] = check_type(key, value)
        except ValueError as e:
            raise ConfigError(f"{where(key)}: {key} = {value!r}: expected {e}") from None
    cfg = TrainConfig(**typed)
    bad = check_values(cfg)
    if bad:
        key, why = bad[0]
        raise ConfigError(f"{where(key)}: {key} = {getattr(cfg, key)!r}: {why}")
    if cfg.datasets:
        from tokentrain.data.mixture import parse_sources

        try:
            parse_sources(cfg.datasets)
        except ValueError as e:
            raise ConfigError(f"{where('datasets')}: {e}") from None
    return cfg


def read_settings(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{shown(p)}: config file not found" + (" (it is a folder)" if p.is_dir() else ""))
    try:
        namespace = runpy.run_path(str(p), run_name="__tokentrain_config__")
    except SyntaxError as e:
        raise ConfigError(f"{p}:{e.lineno}: syntax error in config: {e.msg}") from None
    except SystemExit as e:  # a config that exits would otherwise end the run with its code, having done nothing
        raise ConfigError(
            f"{p}: the config called sys.exit({e.code!r}); a config only sets values, remove the call"
        ) from None
    except Exception as e:
        top = (getattr(e, "name", None) or "").split(".")[0] if isinstance(e, ImportError) else ""
        why = "; a tokentrain config is plain settings: remove the XTuner imports" if top in _XTUNER_MODULES else ""
        raise ConfigError(f"{p}: executing the config failed: {type(e).__name__}: {e}{why}") from None
    return _settings_of(namespace)


def load_config(path: str | os.PathLike, options: list[str] | None = None, **overrides) -> TrainConfig:
    """Load a config file, apply `--cfg-options` strings, then keyword overrides."""
    parsed = dict(parse_override(o) for o in (options or []))
    origins = dict.fromkeys(parsed, "--cfg-options")
    kw = {k: v for k, v in overrides.items() if v is not None}
    parsed.update(kw)
    origins.update({k: f"--{k.replace('_', '-')}" for k in kw})
    unknown = [k for k in parsed if k not in FIELDS]
    if unknown:
        raise unknown_keys(unknown, "")
    return build_config(read_settings(path), str(path), parsed, origins)


def missing_demo_model(path: str) -> str | None:
    """The demo configs name 'demo/tiny-llama', which exists only in a source checkout;
    elsewhere it would be taken for a hub id (a minute of retries, then a confusing error)."""
    p = Path(path).expanduser()
    if p.exists() or p.name != "tiny-llama":
        return None
    return (
        f"{shown(path)}: no such model folder (the demo model ships with the source checkout); "
        "write the demo with `tokentrain demo DIR` (its model, data and config; then `cd DIR`), or point "
        "pretrained_model_name_or_path at your model"
    )
