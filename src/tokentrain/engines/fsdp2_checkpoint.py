"""FSDP2 checkpoints: `torch.distributed.checkpoint` (DCP) files in ``step_N/fsdp/``.

Every rank writes its own shards (``__R_0.distcp``); rank 0 writes the index
(``.metadata``). DCP records each tensor's global shape and which slice each file holds,
so a checkpoint loads on any world size: each rank reads exactly the slices of its new
shards (2 ranks -> 1 -> 2 resumes to the same parameters). Saved: the model (HF names) and
the optimizer's per-parameter state, tensors only; the optimizer's hyperparameters come
from the config and the lr from the scheduler state, as for the other engines.

No code from checkpoints: DCP reads ``.metadata`` with plain `pickle.load` and non-tensor
items with `torch.load(weights_only=False)`. Here the index is read by a restricted
unpickler that accepts only DCP's own metadata classes (and torch sizes, dtypes, layouts,
paths); any other global is refused with one line naming the file (exit 3). The index
must describe tensors only, so no item is ever read with `weights_only=False`; tensor
data itself is read by DCP with `torch.load(weights_only=True)`.

`read_full_state_dict` gives the whole model on the CPU, without a process group (for
`tokentrain convert pth_to_hf`), and `read_full_optimizer_state` the AdamW state by parameter
name: what the local/DDP engine resumes from. The other way, `load_plain` fills the shards
from a plain (local/DDP) checkpoint: rank 0 reads it and DCP's state-dict API broadcasts
each tensor and keeps the slice of this rank.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from tokentrain.errors import DataError, first_line

FSDP_DIR = "fsdp"
METADATA = ".metadata"
MODEL, OPTIM = "model", "optim"

_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "ChunkStorageMetadata",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class UnsafeCheckpoint(DataError):
    """A checkpoint file holds something other than what our engines write (exit 3)."""


def is_fsdp_checkpoint(folder: Path) -> bool:
    return (Path(folder) / FSDP_DIR / METADATA).is_file()


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def read_metadata(path: Path):
    """DCP's index of `path` (a folder), read without running code from it."""
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    file = Path(path) / METADATA
    try:
        with open(file, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except Exception as e:
        raise UnsafeCheckpoint(
            f"{file}: refused, not a DCP index written by tokentrain ({type(e).__name__}: {e}); "
            "nothing from it was run; use another checkpoint"
        ) from None
    if not isinstance(md, Metadata):
        raise UnsafeCheckpoint(f"{file}: refused, holds a {type(md).__name__}, not a DCP index; use another checkpoint")
    odd = [k for k, v in md.state_dict_metadata.items() if not isinstance(v, TensorStorageMetadata)]
    if odd:
        raise UnsafeCheckpoint(
            f"{file}: refused, entry {odd[0]!r} is not a tensor (tokentrain writes tensors only); "
            "use another checkpoint"
        )
    return md


def _reader(path: Path):
    """DCP's file reader, with the index read by `read_metadata`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            md = read_metadata(Path(self.path))
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeReader(str(path))


def save(model, optimizer, folder: Path) -> None:
    """Every rank's shards of model and optimizer state into `folder/fsdp/` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    try:
        dcp.save({MODEL: msd, OPTIM: {"state": osd["state"]}}, checkpoint_id=str(folder / FSDP_DIR))
    except CheckpointException as e:  # a BaseException: `except Exception` up the stack would miss it
        raise plain_error(e, folder / FSDP_DIR) from None


def plain_error(e: BaseException, path: Path) -> Exception:
    """DCP's CheckpointException as an ordinary exception: the first rank's own failure (an
    OSError keeps its errno and file, so a full disk reads as one), else a RuntimeError."""
    failures = getattr(e, "failures", None) or {}
    for exc, _trace in failures.values():
        if isinstance(exc, OSError):
            return OSError(exc.errno, exc.strerror, exc.filename or str(path))
    first = next((exc for exc, _ in failures.values()), e)
    return RuntimeError(f"{path}: {type(first).__name__}: {first_line(first)}")


def load(model, optimizer, folder: Path) -> None:
    """Restore model and optimizer shards from `folder/fsdp/`, whatever world size wrote it."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = folder / FSDP_DIR
    if not is_fsdp_checkpoint(folder):
        from tokentrain.errors import ConfigError

        raise ConfigError(f"{folder}: no FSDP2 checkpoint in it ({FSDP_DIR}/); was it written without --engine fsdp2?")
    read_metadata(path)  # refuses a foreign index before DCP unpickles it
    msd, osd = get_state_dict(model, optimizer)  # the current shards: DCP fills them in place
    state: dict[str, Any] = {MODEL: msd, OPTIM: {"state": osd["state"]}}
    _dcp_load(state, path)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state[MODEL],
        optim_state_dict={"state": state[OPTIM]["state"], "param_groups": osd["param_groups"]},
    )


def read_full_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The whole model of an FSDP2 checkpoint as CPU tensors (HF names); no process group."""
    path = Path(folder) / FSDP_DIR
    md = read_metadata(path)
    prefix = MODEL + "."
    state = {
        k[len(prefix) :]: torch.empty(tuple(v.size), dtype=v.properties.dtype)
        for k, v in md.state_dict_metadata.items()
        if k.startswith(prefix)
    }
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        _dcp_load({MODEL: state}, path, no_dist=True)
    return state


def read_full_optimizer_state(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The optimizer state of an FSDP2 checkpoint, whole, as CPU tensors by parameter name
    ({name: {"step", "exp_avg", "exp_avg_sq"}}); no process group. DCP's index records the
    path of every flattened key (``planner_data``), so names with dots in them are exact."""
    path = Path(folder) / FSDP_DIR
    md = read_metadata(path)
    where = md.planner_data or {}
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in md.state_dict_metadata.items():
        if not key.startswith(OPTIM + "."):
            continue
        route = tuple(where.get(key) or ())
        if len(route) != 4 or route[:2] != (OPTIM, "state") or not all(isinstance(x, str) for x in route):
            raise UnsafeCheckpoint(
                f"{path / METADATA}: entry {key!r} is not a per-parameter optimizer state; use another checkpoint"
            )
        state.setdefault(route[2], {})[route[3]] = torch.empty(tuple(v.size), dtype=v.properties.dtype)
    with warnings.catch_warnings():  # (see read_full_state_dict)
        warnings.simplefilter("ignore", UserWarning)
        _dcp_load({OPTIM: {"state": state}}, path, no_dist=True)
    return state


def load_plain(model, optimizer, folder: Path, is_main: bool, broadcast: bool = True) -> None:
    """Fill the model and optimizer shards from a plain (local/DDP) checkpoint, whatever world
    size wrote it (collective): the main rank reads the whole state (weights-only), DCP's
    state-dict API broadcasts it tensor by tensor and every rank keeps its own slices. Without
    `broadcast` (shards in host memory, which NCCL cannot send) every rank reads the files and
    keeps its slices. The optimizer state moves by parameter name (`plain_checkpoint.read_optimizer_by_name`)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from tokentrain.engines.plain_checkpoint import read_model_state as read_plain_model
    from tokentrain.engines.plain_checkpoint import read_optimizer_by_name
    from tokentrain.errors import CheckpointError

    _, osd = get_state_dict(model, optimizer)  # the param groups by name, hyperparameters from the config
    groups: Any = osd["param_groups"]
    names: list[str] = [n for g in groups for n in g["params"]]
    msd: dict[str, Any] = {}
    optim: dict[str, Any] = {}
    error: Exception | None = None
    if is_main or not broadcast:
        try:
            msd = read_plain_model(Path(folder))
            optim = {"state": read_optimizer_by_name(Path(folder), names), "param_groups": groups}
        except Exception as e:  # every rank stops with it, none waits in the broadcast below
            error = e
    failed = [error is not None]
    dist.broadcast_object_list(failed, src=0)
    if error is not None:
        raise error
    if failed[0]:
        raise CheckpointError(f"{folder}: refused by rank 0 (see its message)")
    # Two calls: set_state_dict would skip the model on the ranks that pass no state (optim_only).
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast)
    set_model_state_dict(model, msd, options=options)
    set_optimizer_state_dict(model, optimizer, optim, options=options)


def _dcp_load(state: dict, path: Path, **kwargs) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, storage_reader=_reader(path), **kwargs)
    except UnsafeCheckpoint:
        raise
    except CheckpointException as e:  # a BaseException (see `save`)
        first = plain_error(e, path)
        raise UnsafeCheckpoint(f"{path}: cannot be read ({first_line(first)}); use another checkpoint") from None
    except Exception as e:
        raise UnsafeCheckpoint(
            f"{path}: cannot be read ({type(e).__name__}: {first_line(e)}); use another checkpoint"
        ) from None


# The contract of a checkpoint-format module (engines/specs.FORMAT_MODULES).
owns_checkpoint = is_fsdp_checkpoint
read_model_state = read_full_state_dict


def safe_globals() -> list:
    """Nothing: DCP's tensor files load weights-only, its index by the restricted reader."""
    return []
