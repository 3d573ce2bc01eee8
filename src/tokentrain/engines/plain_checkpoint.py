"""The "plain" checkpoint format of the local and DDP engines, read without an engine or a
process group: ``model.safetensors`` (fp32 weights of the HF model) and ``optimizer.pt`` (the
optimizer state dict: tensors, numbers and containers only). Its own module because three
readers share it: the local/DDP engines, FSDP2 (a plain checkpoint resumed there,
`fsdp2_checkpoint.load_plain`) and `convert` (engines/specs.py: FORMAT_MODULES)."""

from __future__ import annotations

from pathlib import Path

import torch

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


def safe_globals() -> list:
    """Nothing beyond tensors: optimizer.pt holds tensors, numbers and containers only."""
    return []


def owns_checkpoint(folder: Path) -> bool:
    return (Path(folder) / MODEL_FILE).is_file()


def read_model_state(folder: Path) -> dict[str, torch.Tensor]:
    """The HF model's state dict (names as in the HF model) from a plain checkpoint, on the CPU.

    safetensors stores a tensor shared by two names (tied embeddings) once and records the
    dropped name in the file's metadata ({dropped: kept}); both names come back here."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = str(Path(folder) / MODEL_FILE)
    state = load_file(path)
    with safe_open(path, framework="pt") as f:
        aliases = f.metadata() or {}
    for dropped, kept in aliases.items():
        if dropped not in state and kept in state:
            state[dropped] = state[kept]
    return state


def read_optimizer_by_name(folder: Path, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """optimizer.pt's per-parameter state by parameter name, on the CPU: `names` are the
    parameters of the reading optimizer in its order, the order the plain optimizer saved
    its indices in (one param group, built over the same model by the trainer)."""
    from tokentrain.errors import CheckpointError

    path = Path(folder) / OPTIMIZER_FILE
    saved = torch.load(path, map_location="cpu", weights_only=True)
    order = [i for g in saved["param_groups"] for i in g["params"]]
    if len(order) != len(names):
        raise CheckpointError(
            f"{path}: holds the optimizer state of {len(order)} parameters, this model has {len(names)}; "
            "resume with the model it was trained with"
        )
    return {name: saved["state"][i] for name, i in zip(names, order, strict=True) if i in saved["state"]}
