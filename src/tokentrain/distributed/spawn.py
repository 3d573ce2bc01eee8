"""`NPROC_PER_NODE=N tokentrain train ...`: start torchrun ourselves, as xtuner users expect.

Variables (all optional but NPROC_PER_NODE): NNODES, NODE_RANK, ADDR, PORT. The job's
exit code comes back: torchrun itself only says 1 for any failed worker, so each rank
writes its own code to a file in ``$TOKENTRAIN_EXIT_DIR`` (see ``record_exit_code``) and
the most meaningful one -- rank 0's if it failed, else the first failing rank's -- is
returned.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from tokentrain.run import parent_watch

INSIDE_LAUNCHER_VARS = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_PROCID")


def wants_spawn(environ=os.environ) -> bool:
    """NPROC_PER_NODE is set (even to nothing: `check_nproc` refuses that) outside a launcher."""
    return "NPROC_PER_NODE" in environ and not any(v in environ for v in INSIDE_LAUNCHER_VARS)


def check_nproc(environ=os.environ) -> int:
    """NPROC_PER_NODE as a number of ranks, before anything starts: a value torchrun would
    reject after its own traceback is one line here; many more ranks than cores on a CPU-only
    machine is a warning (each rank gets a sliver of a core: slower than fewer ranks, and
    collectives may time out)."""
    from tokentrain.errors import ConfigError

    value = environ["NPROC_PER_NODE"]
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(
            f"NPROC_PER_NODE={value!r}: must be a whole number of ranks per node, 1 or more "
            "(e.g. NPROC_PER_NODE=2); unset it to train in one process"
        )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if n > cores and not _has_gpu():
        logging.getLogger(__name__).warning(
            "NPROC_PER_NODE=%d ranks on %d CPU core(s) and no GPU: each rank gets %.2g of a core, slower than "
            "%d rank(s) would be; use NPROC_PER_NODE=%d or fewer",
            n,
            cores,
            cores / n,
            cores,
            cores,
        )
    return n


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _strip_launcher(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--launcher":
            skip = True
            continue
        if a.startswith("--launcher="):
            continue
        out.append(a)
    return out


def torchrun_command(train_args: list[str], environ=os.environ) -> list[str]:
    nnodes = environ.get("NNODES", "1")
    port = environ.get("PORT") or (str(_free_port()) if nnodes == "1" else "29500")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={environ['NPROC_PER_NODE']}",
        f"--nnodes={nnodes}",
        f"--node_rank={environ.get('NODE_RANK', '0')}",
        f"--master_addr={environ.get('ADDR', '127.0.0.1')}",
        f"--master_port={port}",
        "-m",
        "tokentrain.train",
        *_strip_launcher(train_args),
        "--launcher",
        "pytorch",
    ]


def spawn_torchrun(train_args: list[str]) -> int:
    quiet = logging.getLogger().getEffectiveLevel() > logging.DEBUG and "--debug" not in train_args
    with tempfile.TemporaryDirectory(prefix="tokentrain-exit-") as codes:
        env = dict(os.environ, TOKENTRAIN_EXIT_DIR=codes)
        proc = subprocess.Popen(
            # torchrun ends (on SIGTERM it stops its ranks, SIGKILL after 30 s) when this process
            # dies, however it dies; the ranks watch torchrun (run/parent_watch.py).
            parent_watch.tied_to_this_process(torchrun_command(train_args)),
            env=env,
            stderr=subprocess.PIPE if quiet else None,
        )
        # Forward preemption signals; torchrun passes them on to the ranks.
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, lambda s, _f: proc.send_signal(s))
        report = _pass_stderr(proc.stderr) if quiet else []
        rc = proc.wait()
        code = job_exit_code(rc, Path(codes))
        if report and rc != 0:
            failed = sorted(_read_codes(Path(codes)).items())
            print(
                "tokentrain: torchrun: job failed (rank exit codes: "
                f"{', '.join(f'{r}: {c}' for r, c in failed) or 'none recorded'})"
                f"; exit code {code}; run with --debug for torchrun's own report",
                file=sys.stderr,
            )
        return code


def _pass_stderr(stream) -> list[bytes]:
    """Copy the job's stderr (the ranks' lines and torchrun's) through, holding back torchrun's
    closing traceback (ChildFailedError: the ranks already said what failed, in one line each).
    Returns the held-back lines."""
    out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
    held: list[bytes] = []
    for line in stream:
        if held or line.startswith(b"Traceback (most recent call last):"):
            held.append(line)
            continue
        if out is not None:
            out.write(line)
            out.flush()
        else:
            sys.stderr.write(line.decode(errors="replace"))
    if held and not any(b"ChildFailedError" in x for x in held):  # not torchrun's report: show it
        for line in held:
            sys.stderr.write(line.decode(errors="replace"))
        return []
    return held


def _read_codes(codes_dir: Path) -> dict[int, int]:
    codes = {}
    for f in codes_dir.glob("rank*.code"):
        try:
            codes[int(f.stem[4:])] = int(f.read_text())
        except ValueError:
            continue
    return codes


def job_exit_code(torchrun_rc: int, codes_dir: Path) -> int:
    codes = _read_codes(codes_dir)
    if torchrun_rc == 0:
        return 0
    if codes.get(0):
        return codes[0]
    failing = [c for _, c in sorted(codes.items()) if c]
    return failing[0] if failing else torchrun_rc


def record_exit_code(code: int) -> None:
    """Called by every rank on exit when started by `spawn_torchrun`."""
    d = os.environ.get("TOKENTRAIN_EXIT_DIR")
    if not d:
        return
    rank = os.environ.get("RANK", "0")
    try:
        Path(d, f"rank{rank}.code").write_text(str(code))
    except OSError:
        pass
