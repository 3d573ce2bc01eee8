"""The engines, one row each: what every other place derives its engine facts from (the config
key's and ``--engine``'s choices, the class to build, the checkpoint format and how a user
selects it, whether a checkpoint moves to another world size). A new engine is one module and
one row here.

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
        ),
        EngineSpec(
            "ddp", "tokentrain.engines.ddp", "DDPEngine", "plain", "the local or ddp engine (no --deepspeed)", True
        ),
        EngineSpec("deepspeed", "tokentrain.engines.deepspeed", "DeepSpeedEngine", "deepspeed", "--deepspeed", False),
        EngineSpec("fsdp2", "tokentrain.engines.fsdp2", "FSDP2Engine", "fsdp2", "--engine fsdp2", True),
    )
}
ENGINES = tuple(SPECS)
CHOICES = ("auto", *ENGINES)  # the `engine` config key and --engine

# Checkpoint format -> the module that reads it without a process group (for resume checks and
# `convert`). Each gives owns_checkpoint(folder), read_model_state(folder) and safe_globals().
FORMAT_MODULES = {
    "plain": "tokentrain.engines.local",
    "deepspeed": "tokentrain.engines.deepspeed",
    "fsdp2": "tokentrain.engines.fsdp2_checkpoint",
}
FLAGS = {s.checkpoint_format: s.flag for s in reversed(SPECS.values())}  # format -> the first engine writing it
