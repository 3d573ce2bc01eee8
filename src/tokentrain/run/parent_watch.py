"""No rank outlives its launcher (docs/reliability.md, "When the launcher dies").

A rank is a child of its launcher's agent (torchrun, srun's slurmstepd), and torchrun puts
each rank in a session of its own: once the agent is killed (SIGKILL, a scheduler, the OOM
killer) nothing else would ever stop the ranks. So:

* a rank asks the kernel for SIGTERM when its parent dies (Linux ``PR_SET_PDEATHSIG``):
  it stops as if preempted -- after the step, a checkpoint if the ranks can still agree,
  exit 75 -- and a thread watching the parent pid catches what the kernel cannot signal
  (a parent gone before the request was made, another OS);
* once the parent is gone, the same thread ends the rank after a grace period
  (``TOKENTRAIN_ORPHAN_GRACE`` seconds, default 60), whatever it is doing: a checkpoint may
  wait forever on a collective with a peer that died too;
* ``tokentrain``'s own torchrun (``NPROC_PER_NODE``) gets SIGTERM when ``tokentrain`` dies,
  and passes it to its ranks (SIGKILL after its own 30 s); data-loader workers get SIGKILL
  when their rank dies.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from functools import partial

from tokentrain.errors import EXIT_FAILURE, ConfigError

# The parent this process was started by, read when the CLI is imported (as early as we can:
# a parent that dies between exec and here is seen by the watcher as "already gone").
PARENT_AT_START = os.getppid()
GRACE_VAR = "TOKENTRAIN_ORPHAN_GRACE"
DEFAULT_GRACE_S = 60.0
POLL_S = 0.5
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _prctl():
    """libc's prctl, or None off Linux; looked up before any fork (preexec runs in the child)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def set_death_signal(sig: int, prctl=None) -> bool:
    """Ask for `sig` when the parent dies; whether the kernel took the request."""
    prctl = prctl or _prctl()
    if prctl is None:
        return False
    zero = ctypes.c_ulong(0)
    return prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(int(sig)), zero, zero, zero) == 0


def grace_seconds(environ=os.environ) -> float:
    value = environ.get(GRACE_VAR, "")
    if not value:
        return DEFAULT_GRACE_S
    try:
        grace = float(value)
    except ValueError:
        grace = -1.0
    if not 0 < grace < float("inf"):
        raise ConfigError(
            f"{GRACE_VAR}={value!r}: must be a number of seconds above 0 (how long a rank whose launcher "
            f"died may take to stop cleanly; default {DEFAULT_GRACE_S:g}); fix or unset it"
        )
    return grace


def tied_to_this_process(cmd: list[str]) -> list[str]:
    """`python -m MODULE ARGS` as a child that gets SIGTERM when this process dies, however it
    dies (run through `main` below: no preexec_fn, which is unsafe once threads exist)."""
    python, flag, module, *args = cmd
    assert flag == "-m", cmd
    return [python, "-m", __name__, str(os.getpid()), module, *args]


def main(argv: list[str]) -> None:
    """`python -m tokentrain.run.parent_watch PARENT_PID MODULE ARGS`: run MODULE as `python -m`
    would, dying with PARENT_PID; at once if it is already gone."""
    parent, module, *args = argv
    set_death_signal(signal.SIGTERM)
    if os.getppid() != int(parent):
        _say(f"tokentrain: the process that started {module} (pid {parent}) is gone; not starting it")
        sys.exit(EXIT_FAILURE)
    import runpy

    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def worker_init(parent: int) -> None:
    """In a data-loader worker: die with the rank that forked it (`parent`), at once."""
    set_death_signal(signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(0)


def worker_init_fn(then=None):
    """A DataLoader `worker_init_fn`: `worker_init` with this process as the parent, then `then`."""
    return partial(_init_worker, os.getpid(), then)


def _init_worker(parent: int, then, worker_id: int) -> None:
    worker_init(parent)
    if then is not None:
        then(worker_id)


def watch_launcher(grace: float | None = None) -> None:
    """At a rank's start-up (`--launcher pytorch|slurm`): stop like a preempted run when the
    launcher dies, and end within the grace period whatever happens."""
    grace = grace_seconds() if grace is None else grace
    parent = PARENT_AT_START
    signalled = set_death_signal(signal.SIGTERM) and os.getppid() == parent  # else: no signal will come
    threading.Thread(
        target=_watch, args=(parent, grace, signalled), name="tokentrain-launcher-watch", daemon=True
    ).start()


def _watch(parent: int, grace: float, signalled: bool) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_S)
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "?"
    _say(
        f"tokentrain: rank {rank}: its launcher (pid {parent}) is gone; stopping this rank (a checkpoint if "
        f"the ranks can still write one), within {grace:g} s ({GRACE_VAR})"
    )
    if signal.getsignal(signal.SIGALRM) == signal.SIG_DFL:  # a backstop the kernel enforces
        signal.alarm(min(int(grace) + 10, 2**31 - 1))
    if not signalled:
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)
    _say(f"tokentrain: rank {rank}: still running {grace:g} s after its launcher died; ending it now")
    os._exit(EXIT_FAILURE)


def _say(text: str) -> None:
    try:
        os.write(2, (text + "\n").encode())
    except OSError:  # the launcher held our stderr: a pipe that may be gone with it
        pass


if __name__ == "__main__":
    main(sys.argv[1:])
