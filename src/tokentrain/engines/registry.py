"""Engine names -> engines, and checkpoint folders -> the engine whose format they hold.

    local      one process                         (engines/local.py)
    ddp        DistributedDataParallel             (engines/ddp.py)
    deepspeed  DeepSpeed ZeRO 1/2/3, offload       (engines/deepspeed.py; --deepspeed PRESET|JSON)
    fsdp2      torch FSDP2 (fully_shard)           (engines/fsdp2.py)

`choose` resolves ``auto`` (the default of ``--engine`` and of the ``engine`` config key):
deepspeed when --deepspeed is given, else ddp when there is more than one rank, else local.
Engine modules are imported only when used (DeepSpeed takes seconds to import).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from tokentrain.errors import ConfigError

if TYPE_CHECKING:
    from tokentrain.engines.base import Engine

ENGINES = ("local", "ddp", "deepspeed", "fsdp2")
CHOICES = ("auto", *ENGINES)
MODULES = {name: f"tokentrain.engines.{name}" for name in ENGINES}
# How to select the engine that writes each checkpoint format (for messages).
FLAGS = {"plain": "the local or ddp engine (no --deepspeed)", "deepspeed": "--deepspeed", "fsdp2": "--engine fsdp2"}


def engine_module(name: str):
    try:
        return importlib.import_module(MODULES[name])
    except ModuleNotFoundError as e:
        if e.name != MODULES[name]:
            raise
        raise ConfigError(f"engine {name!r} is not available in this installation ({MODULES[name]} is missing)") from e


def choose(requested: str, *, deepspeed: bool, world_size: int) -> str:
    """The engine name for a run (``requested`` from --engine or the config key)."""
    if requested not in CHOICES:
        raise ConfigError(f"engine {requested!r}: unknown; choose one of {', '.join(CHOICES)}")
    if deepspeed and requested not in ("auto", "deepspeed"):
        raise ConfigError(f"--deepspeed selects the deepspeed engine, but engine = {requested!r}; drop one of them")
    if requested == "auto":
        return "deepspeed" if deepspeed else ("ddp" if world_size > 1 else "local")
    if requested == "deepspeed" and not deepspeed:
        raise ConfigError(
            "engine 'deepspeed' needs a DeepSpeed config: add --deepspeed PRESET|JSON (deepspeed_zero2 ...)"
        )
    if requested == "local" and world_size > 1:
        raise ConfigError(f"engine 'local' runs one process, this job has {world_size} ranks; use ddp (or auto)")
    return requested


def build_engine(name: str, cfg, env, deepspeed: dict | None = None) -> Engine:
    """The engine of a run, made before the model (ZeRO-3 and FSDP2 build it sharded).
    `deepspeed` is the DeepSpeed config with its "auto" values unresolved."""
    if name == "local":
        from tokentrain.engines.local import LocalEngine

        return LocalEngine(env)
    if name == "ddp":
        from tokentrain.engines.ddp import DDPEngine

        return DDPEngine(env)
    if name == "deepspeed":
        from tokentrain.engines.deepspeed import DeepSpeedEngine
        from tokentrain.engines.deepspeed_config import resolve_for_run

        assert deepspeed is not None, "choose() picks 'deepspeed' only with a DeepSpeed config"
        return DeepSpeedEngine(env, resolve_for_run(deepspeed, cfg, env))
    if name == "fsdp2":
        from tokentrain.model.lm import autocast_dtype

        compute = autocast_dtype(cfg.dtype, env.device)
        return engine_module("fsdp2").FSDP2Engine(env, compute, cfg.fsdp_cpu_offload)
    raise ConfigError(f"engine {name!r}: unknown; choose one of {', '.join(ENGINES)}")


# ------------------------------------------------------------------ checkpoints


def checkpoint_record(folder: Path) -> dict:
    """What COMPLETE says about a checkpoint ({} when unreadable or old)."""
    try:
        info = json.loads((Path(folder) / "COMPLETE").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


# format -> (module, "does this folder hold it" function, "HF state dict from it" function,
# allow-list of pickled globals: a function or a list, or None for nothing beyond tensors)
FORMATS = {
    "plain": ("tokentrain.engines.local", "owns_checkpoint", "read_model_state", "SAFE_GLOBALS"),
    "deepspeed": ("tokentrain.engines.deepspeed", "owns_checkpoint", "read_model_state", "safe_globals"),
    "fsdp2": ("tokentrain.engines.fsdp2_checkpoint", "is_fsdp_checkpoint", "read_full_state_dict", None),
}


def _format_module(fmt: str):
    module = FORMATS[fmt][0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise ConfigError(f"checkpoint format {fmt!r} needs {module}, which is not in this installation") from e


def checkpoint_format(folder: Path) -> str | None:
    """The format a checkpoint folder holds: recorded in COMPLETE, else told by its files."""
    fmt = checkpoint_record(folder).get("format")
    if fmt in FORMATS:
        return fmt
    for name, (_, owns, _, _) in FORMATS.items():
        try:
            if getattr(_format_module(name), owns)(Path(folder)):
                return name
        except ConfigError:
            continue
    return None


def _reader_module(folder: Path):
    fmt = checkpoint_format(folder)
    if fmt is None:
        raise ConfigError(f"{folder}: not a tokentrain checkpoint (no model.safetensors, ds/ or fsdp/ in it)")
    return fmt, _format_module(fmt)


def read_model_state(folder: Path) -> dict:
    """The HF model's state dict from any engine's checkpoint, on the CPU, no process group."""
    from tokentrain.checkpoint.safety import refused_as_unsafe

    fmt, module = _reader_module(folder)
    with refused_as_unsafe(folder):
        return getattr(module, FORMATS[fmt][2])(Path(folder))


def safe_globals(folder: Path) -> list:
    """The pickled globals the `.pt` files of this checkpoint may hold (its engine's allow-list)."""
    fmt, module = _reader_module(folder)
    name = FORMATS[fmt][3]
    allowed = getattr(module, name, None) if name else None
    return list(allowed()) if callable(allowed) else list(allowed or [])


def check_resumable(folder: Path, engine: Engine, world_size: int) -> None:
    """Refuse, in one line, a checkpoint the chosen engine cannot read: another engine's
    format (naming it and the flag to use), or another world size for an engine that
    cannot change it."""
    record = checkpoint_record(folder)
    fmt = checkpoint_format(folder)
    mine = engine.checkpoint_format
    writer = record.get("engine") or ("local/ddp" if fmt == "plain" else fmt)
    if fmt != mine:
        flag = f"--engine {writer}" if fmt is None else FLAGS.get(fmt, f"--engine {writer}")
        if fmt == "deepspeed" and record.get("zero_stage") is not None:
            flag = f"--deepspeed deepspeed_zero{record['zero_stage']} (or the JSON it was trained with)"
        raise ConfigError(
            f"{folder} was written by the {writer} engine ({fmt} format) and cannot be read by the {engine.name} "
            f"engine; resume with {flag}, or convert it with `tokentrain convert pth_to_hf` and start from that folder"
        )
    stage, mine_stage = record.get("zero_stage"), engine.stage
    if fmt == "deepspeed" and stage is not None and mine_stage is not None and stage != mine_stage:
        raise ConfigError(
            f"{folder} was written with DeepSpeed ZeRO stage {stage}, this run uses stage {mine_stage}; resume with "
            f"--deepspeed deepspeed_zero{stage} (or the JSON it was trained with)"
        )
    written = record.get("world_size")
    if written and written != world_size and not engine.resumes_on_other_world_size:
        raise ConfigError(
            f"{folder} was written by {written} ranks; the {engine.name} engine resumes only on the same world size: "
            f"run with {written} ranks, or convert it with `tokentrain convert pth_to_hf` and start from that folder"
        )
