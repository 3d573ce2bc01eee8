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

from tokentrain.errors import ConfigError

ENGINES = ("local", "ddp", "deepspeed", "fsdp2")
CHOICES = ("auto", *ENGINES)
MODULES = {name: f"tokentrain.engines.{name}" for name in ENGINES}
# How to select the engine that writes each checkpoint format (for messages).
FLAGS = {"plain": "the local or ddp engine (no --deepspeed)", "deepspeed": "--deepspeed", "fsdp2": "--engine fsdp2"}
FORMAT_OF = {"local": "plain", "ddp": "plain", "deepspeed": "deepspeed", "fsdp2": "fsdp2"}


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


def build_engine(name: str, cfg, env, deepspeed: dict | None = None):
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

        return DeepSpeedEngine(env, resolve_for_run(deepspeed, cfg, env))
    if name == "fsdp2":
        return engine_module("fsdp2").FSDP2Engine(env)
    raise ConfigError(f"engine {name!r}: unknown; choose one of {', '.join(ENGINES)}")


# ------------------------------------------------------------------ checkpoints


def checkpoint_record(folder: Path) -> dict:
    """What COMPLETE says about a checkpoint ({} when unreadable or old)."""
    try:
        info = json.loads((Path(folder) / "COMPLETE").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def checkpoint_format(folder: Path) -> str | None:
    """The format a checkpoint folder holds: recorded in COMPLETE, else told by its files."""
    fmt = checkpoint_record(folder).get("format")
    if fmt:
        return fmt
    for name in ("deepspeed", "local", "fsdp2"):
        try:
            owns = getattr(engine_module(name), "owns_checkpoint", None)
        except ConfigError:
            continue
        if owns is not None and owns(Path(folder)):
            return FORMAT_OF[name]
    return None


def _reader(fmt: str | None, folder: Path):
    name = {"plain": "local", "deepspeed": "deepspeed", "fsdp2": "fsdp2"}.get(fmt or "")
    if name is None:
        raise ConfigError(f"{folder}: not a tokentrain checkpoint (no model.safetensors, ds/ or fsdp2 state in it)")
    return engine_module(name)


def read_model_state(folder: Path) -> dict:
    """The HF model's state dict from any engine's checkpoint, on the CPU, no process group."""
    return _reader(checkpoint_format(folder), folder).read_model_state(Path(folder))


def safe_globals(folder: Path) -> list:
    """The pickled globals the `.pt` files of this checkpoint may hold (its engine's allow-list)."""
    module = _reader(checkpoint_format(folder), folder)
    names = getattr(module, "safe_globals", None)
    return list(names()) if callable(names) else list(getattr(module, "SAFE_GLOBALS", []))


def check_resumable(folder: Path, engine, world_size: int) -> None:
    """Refuse, in one line, a checkpoint the chosen engine cannot read: another engine's
    format (naming it and the flag to use), or another world size for an engine that
    cannot change it."""
    record = checkpoint_record(folder)
    fmt = checkpoint_format(folder)
    mine = getattr(engine, "checkpoint_format", FORMAT_OF.get(engine.name))
    writer = record.get("engine") or {"plain": "local/ddp"}.get(fmt, fmt)
    if fmt != mine:
        flag = FLAGS.get(fmt, f"--engine {writer}")
        if fmt == "deepspeed" and record.get("zero_stage") is not None:
            flag = f"--deepspeed deepspeed_zero{record['zero_stage']} (or the JSON it was trained with)"
        raise ConfigError(
            f"{folder} was written by the {writer} engine ({fmt} format) and cannot be read by the {engine.name} "
            f"engine; resume with {flag}, or convert it with `tokentrain convert pth_to_hf` and start from that folder"
        )
    stage, mine_stage = record.get("zero_stage"), getattr(engine, "stage", None)
    if fmt == "deepspeed" and stage is not None and mine_stage is not None and stage != mine_stage:
        raise ConfigError(
            f"{folder} was written with DeepSpeed ZeRO stage {stage}, this run uses stage {mine_stage}; resume with "
            f"--deepspeed deepspeed_zero{stage} (or the JSON it was trained with)"
        )
    written = record.get("world_size")
    if written and written != world_size and not getattr(engine, "resumes_on_other_world_size", True):
        raise ConfigError(
            f"{folder} was written by {written} ranks; the {engine.name} engine resumes only on the same world size: "
            f"run with {written} ranks, or convert it with `tokentrain convert pth_to_hf` and start from that folder"
        )
