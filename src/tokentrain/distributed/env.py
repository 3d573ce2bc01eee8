"""Rank, world and device from the launcher's environment, and the process group.

Three launchers:

* ``none``    -- one process (rank 0 of 1); no process group.
* ``pytorch`` -- torchrun / ``python -m torch.distributed.launch``: RANK, WORLD_SIZE,
  LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
* ``slurm``   -- one task per rank under ``srun``: rank = SLURM_PROCID, world =
  SLURM_NTASKS, local rank = SLURM_LOCALID; master = MASTER_ADDR or the first host of
  ``scontrol show hostnames $SLURM_JOB_NODELIST``; port = MASTER_PORT or derived from
  SLURM_JOB_ID. Unlike mmengine's slurm init, nothing here assumes CUDA, so it runs on CPU.

Whatever the launcher, the torchrun variables are exported afterwards, so that anything
downstream (DeepSpeed, ``env://``) sees one consistent picture.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import subprocess
from dataclasses import dataclass

from tokentrain.errors import ConfigError

log = logging.getLogger(__name__)

# The launchers, the one list of their names (--launcher's choices and help, the messages):
# name -> how it starts the ranks. `read_launcher_env` reads each one's variables.
LAUNCHER_HELP = {"none": "one process", "pytorch": "under torchrun", "slurm": "one task per rank under srun"}
LAUNCHERS = tuple(LAUNCHER_HELP)


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: object = None  # torch.device
    backend: str = "gloo"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int_env(name: str, launcher: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise ConfigError(
            f"--launcher {launcher}: environment variable {name} is not set; start the job with "
            + ("torchrun / python -m torch.distributed.launch" if launcher == "pytorch" else "srun")
        )
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--launcher {launcher}: {name}={value!r} is not an integer") from None


def _slurm_tasks_on_node(spec: str, node_index: int) -> int:
    """SLURM_TASKS_PER_NODE like '2(x3),1' -> tasks on the node_index-th node."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return 1
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_index] if node_index < len(counts) else counts[-1]


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
        )
        hosts = out.stdout.split()
        if hosts:
            return hosts[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # No scontrol on this host: expand the simple forms ourselves ("node[01-04,07]" -> node01).
    m = re.match(r"([^\[,]+)(?:\[(\d+)[^\]]*\])?", nodelist)
    if not m:
        raise ConfigError(f"--launcher slurm: cannot read a host from SLURM_JOB_NODELIST={nodelist!r}; set MASTER_ADDR")
    return m.group(1) + (m.group(2) or "")


def _read_slurm() -> dict:
    rank = _int_env("SLURM_PROCID", "slurm")
    world = _int_env("SLURM_NTASKS", "slurm")
    local_rank = _int_env("SLURM_LOCALID", "slurm")
    node_id = int(os.environ.get("SLURM_NODEID", "0"))
    local_world = _slurm_tasks_on_node(os.environ.get("SLURM_TASKS_PER_NODE", str(world)), node_id)
    addr = os.environ.get("MASTER_ADDR")
    if not addr:
        nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
        if not nodelist:
            raise ConfigError("--launcher slurm: neither MASTER_ADDR nor SLURM_JOB_NODELIST is set; run under srun")
        addr = _first_slurm_host(nodelist)
    port = os.environ.get("MASTER_PORT")
    if not port:
        job = int(os.environ.get("SLURM_JOB_ID", "0"))
        port = str(20000 + job % 20000)  # same on every task of the job, spread across jobs
    return dict(rank=rank, world=world, local_rank=local_rank, local_world=local_world, addr=addr, port=port)


def _read_pytorch() -> dict:
    world = _int_env("WORLD_SIZE", "pytorch")
    return dict(
        rank=_int_env("RANK", "pytorch"),
        world=world,
        local_rank=_int_env("LOCAL_RANK", "pytorch"),
        local_world=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
        addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        port=os.environ.get("MASTER_PORT", "29500"),
    )


def read_launcher_env(launcher: str) -> dict:
    if launcher == "none":
        return dict(rank=0, world=1, local_rank=0, local_world=1, addr="127.0.0.1", port="29500")
    if launcher == "pytorch":
        return _read_pytorch()
    if launcher == "slurm":
        return _read_slurm()
    raise ConfigError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")


def set_thread_count(local_world: int) -> None:
    """Several ranks on one node each default to all cores and thrash; share them out."""
    if "OMP_NUM_THREADS" in os.environ or local_world <= 1:
        return
    n = max(1, (os.cpu_count() or 1) // local_world)
    os.environ["OMP_NUM_THREADS"] = str(n)
    import torch

    torch.set_num_threads(n)


def init_distributed(launcher: str, timeout_s: int = 1800) -> DistEnv:
    """Read the launcher's environment, pick the device, and join the process group."""
    info = read_launcher_env(launcher)
    set_thread_count(info["local_world"])
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        device, backend = torch.device("cuda", info["local_rank"] % torch.cuda.device_count()), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    env = DistEnv(info["rank"], info["world"], info["local_rank"], info["local_world"], device, backend)
    if env.world_size > 1:
        os.environ.update(
            RANK=str(env.rank),
            WORLD_SIZE=str(env.world_size),
            LOCAL_RANK=str(env.local_rank),
            LOCAL_WORLD_SIZE=str(env.local_world_size),
            MASTER_ADDR=info["addr"],
            MASTER_PORT=str(info["port"]),
        )
        if not dist.is_initialized():
            dist.init_process_group(
                backend,
                init_method="env://",
                rank=env.rank,
                world_size=env.world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
            )
        log.debug(
            "rank %d/%d (local %d/%d) on %s via %s",
            env.rank,
            env.world_size,
            env.local_rank,
            env.local_world_size,
            device,
            backend,
        )
    return env


def ensure_process_group(env: DistEnv, timeout_s: int = 1800) -> bool:
    """A 1-rank process group for an engine that needs one even in a single process (DeepSpeed
    asserts an initialised backend, FSDP2 shards over a mesh): under torchrun its agent's store,
    else loopback on a free port. A no-op when one exists; True when this call created it.

    The one place this is done: a copy that opened its own tcp:// store hung under
    ``torchrun --nproc_per_node=1`` (rank 0 there is a client of the agent's store)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if env.world_size != 1:
        raise RuntimeError("ensure_process_group: a multi-rank process group is joined by init_distributed")
    timeout = datetime.timedelta(seconds=timeout_s)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun --nproc_per_node 1: its agent hosts the store
        dist.init_process_group(env.backend, init_method="env://", rank=0, world_size=1, timeout=timeout)
        return True
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # What a launcher would have set: DeepSpeed reads LOCAL_RANK & co. from the environment.
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    dist.init_process_group(env.backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=timeout)
    return True


def destroy_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
