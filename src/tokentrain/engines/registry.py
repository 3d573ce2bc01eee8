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

from tokentrain.engines.specs import CHOICES, ENGINES, FLAGS, FORMAT_MODULES, SPECS


def _import(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise ConfigError(f"{what} is not available in this installation ({module} is missing)") from e


def choose(requested: str, *, deepspeed: bool, world_size: int) -> str:
    """The engine name for a run (``requested`` from --engine or the config key)."""
    if requested not in CHOICES:
        raise ConfigError(f"engine {requested!r}: unknown; choose one of {', '.join(CHOICES)}")
    if deepspeed and requested not in ("auto", "deepspeed"):
        raise ConfigError(f"--deepspeed and engine {requested!r} exclude each other; drop one of them")
    if requested == "auto":
        return "deepspeed" if deepspeed else ("ddp" if world_size > 1 else "local")
    if requested == "deepspeed" and not deepspeed:
        raise ConfigError(
            "engine 'deepspeed' needs a DeepSpeed config: add --deepspeed PRESET|JSON (deepspeed_zero2 ...)"
        )
    if requested == "local" and world_size > 1:
        raise ConfigError(f"engine 'local' runs one process, this job has {world_size} ranks; use ddp (or auto)")
    return requested


def build_engine(name: str, cfg, env, deepspeed: dict | None, compute_dtype) -> Engine:
    """The engine of a run, made before the model (ZeRO-3 and FSDP2 build it sharded).
    `deepspeed` is the DeepSpeed config with its "auto" values unresolved; `compute_dtype` the
    run's (resolved once, by the trainer)."""
    if name not in SPECS:
        raise ConfigError(f"engine {name!r}: unknown; choose one of {', '.join(ENGINES)}")
    spec = SPECS[name]
    cls = getattr(_import(spec.module, f"engine {name!r}"), spec.cls)
    return cls.create(cfg, env, deepspeed, compute_dtype)


# ------------------------------------------------------------------ checkpoints


def checkpoint_record(folder: Path) -> dict:
    """What COMPLETE says about a checkpoint ({} when unreadable or old)."""
    try:
        info = json.loads((Path(folder) / "COMPLETE").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _format_module(fmt: str):
    return _import(FORMAT_MODULES[fmt], f"checkpoint format {fmt!r}")


def checkpoint_format(folder: Path) -> str | None:
    """The format a checkpoint folder holds: recorded in COMPLETE, else told by its files."""
    fmt = checkpoint_record(folder).get("format")
    if fmt in FORMAT_MODULES:
        return fmt
    for name in FORMAT_MODULES:
        try:
            if _format_module(name).owns_checkpoint(Path(folder)):
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

    _, module = _reader_module(folder)
    with refused_as_unsafe(folder):
        return module.read_model_state(Path(folder))


def safe_globals(folder: Path) -> list:
    """The pickled globals the `.pt` files of this checkpoint may hold (its engine's allow-list)."""
    _, module = _reader_module(folder)
    return list(module.safe_globals())


def check_resumable(folder: Path, engine: Engine, world_size: int) -> None:
    """Refuse, in one line, a checkpoint the chosen engine cannot read: a format its load()
    does not read (naming the writer, the engines that read it, and the conversion), another
    ZeRO stage, or another world size for an engine that cannot change it."""
    record = checkpoint_record(folder)
    fmt = checkpoint_format(folder)
    spec = SPECS[engine.name]
    writer = record.get("engine") or ("local/ddp" if fmt == "plain" else fmt)
    convert = (
        "or convert it with `tokentrain convert pth_to_hf` and start from that folder (without its optimizer state)"
    )
    if fmt not in spec.reads:
        readers = [s.name for s in SPECS.values() if fmt in s.reads]
        flag = f"--engine {' | '.join(readers)} (no --deepspeed)" if readers else f"--engine {writer}"
        if fmt == "deepspeed":
            stage = record.get("zero_stage")
            flag = f"--deepspeed deepspeed_zero{stage} (or the JSON it was trained with)" if stage else FLAGS[fmt]
        raise ConfigError(
            f"{folder} was written by the {writer} engine ({fmt} format) and cannot be read by the {engine.name} "
            f"engine; resume with {flag}, {convert}"
        )
    stage, mine_stage = record.get("zero_stage"), engine.stage
    if fmt == "deepspeed" and stage is not None and mine_stage is not None and stage != mine_stage:
        raise ConfigError(
            f"{folder} was written with DeepSpeed ZeRO stage {stage}, this run uses stage {mine_stage}; resume with "
            f"--deepspeed deepspeed_zero{stage} (or the JSON it was trained with), {convert}"
        )
    written = record.get("world_size")
    if written and written != world_size and not spec.resumes_on_other_world_size:
        raise ConfigError(
            f"{folder} was written by {written} ranks; the {engine.name} engine resumes only on the same world size: "
            f"run with {written} ranks, {convert}"
        )
