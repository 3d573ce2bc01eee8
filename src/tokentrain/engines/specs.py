"""The engines, one row each: what every other place derives its engine facts from (the config
key's and ``--engine``'s choices, the class to build, the checkpoint format and how a user
selects it, whether a checkpoint moves to another world size). A new engine is one module and
one row here.

Which checkpoints move: `reads` lists the formats an engine's load() reads (local/DDP and
FSDP2 read each other's, whole <-> DCP, optimizer state by parameter name); DeepSpeed reads
its own only, at any world size (through DeepSpeed's universal checkpoint). Any other move is
refused in one line naming the conversion (engines/registry.py:check_resumable).

Pure data with no imports of ours: the config schema and the command line read it without
importing an engine (DeepSpeed alone takes seconds to import)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineSpec:
    name: str
    module: str  # where its class lives (imported only when the engine is used)
    cls: str  # the class: Engine protocol (engines/base.py) + `create(cfg, env, deepspeed, compute_dtype)`
    checkpoint_format: str  # what its save() writes: the key of FORMAT_MODULES
    flag: str  # how a user selects it, for messages
    resumes_on_other_world_size: bool  # can its load() read a checkpoint written by another world size?
    reads: tuple[str, ...]  # the checkpoint formats its load() reads (its own first)


SPECS = {
    s.name: s
    for s in (
        EngineSpec(
            "local",
            "tokentrain.engines.local",
            "LocalEngine",
            "plain",
            "the local or ddp engine (no --deepspeed)",
            True,
            ("plain", "fsdp2"),
        ),
        EngineSpec(
            "ddp",
            "tokentrain.engines.ddp",
            "DDPEngine",
            "plain",
            "the local or ddp engine (no --deepspeed)",
            True,
            ("plain", "fsdp2"),
        ),
        EngineSpec(
            "deepspeed",
            "tokentrain.engines.deepspeed",
            "DeepSpeedEngine",
            "deepspeed",
            "--deepspeed",
            True,
            ("deepspeed",),
        ),
        EngineSpec(
            "fsdp2", "tokentrain.engines.fsdp2", "FSDP2Engine", "fsdp2", "--engine fsdp2", True, ("fsdp2", "plain")
        ),
    )
}
ENGINES = tuple(SPECS)
CHOICES = ("auto", *ENGINES)  # the `engine` config key and --engine

# Checkpoint format -> the module that reads it without a process group (for resume checks and
# `convert`). Each gives owns_checkpoint(folder), read_model_state(folder) and safe_globals().
FORMAT_MODULES = {
    "plain": "tokentrain.engines.plain_checkpoint",
    "deepspeed": "tokentrain.engines.deepspeed",
    "fsdp2": "tokentrain.engines.fsdp2_checkpoint",
}
FLAGS = {s.checkpoint_format: s.flag for s in reversed(SPECS.values())}  # format -> the first engine writing it
