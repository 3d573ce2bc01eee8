"""Signals of `tokentrain train`, and the exit codes they end in (see docs/reliability.md).

* During start-up (config, imports, process group; before the trainer's setup) nothing has
  been written yet: SIGTERM/SIGUSR1 end the process at once with 75 (preempted: start it
  again), SIGINT (Ctrl-C) with 130; one line each, no traceback. Once the run has its exit
  code, signals are ignored while the process ends.
* From the trainer's setup on, SIGTERM, SIGUSR1 and SIGINT all mean "stop after this step":
  a checkpoint is written, exit 75 (`--resume auto` continues). A second SIGINT aborts at
  once (exit 130, nothing saved since the last checkpoint).
"""

from __future__ import annotations

import os
import signal

from tokentrain.distributed.spawn import record_exit_code  # loaded before any handler can need it
from tokentrain.errors import EXIT_PREEMPTED

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def _exit_at_start_up(signum, _frame) -> None:
    """Nothing to save yet: say so and leave now. Not by raising an exception: one raised in the
    middle of importing torch (a C extension's init) can abort the interpreter (SIGABRT)."""
    code = EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_PREEMPTED
    _say(
        f"tokentrain: stopped by {signal.Signals(signum).name} during start-up, before training began; nothing "
        "was written; start it again (with --resume auto it continues from the last checkpoint, if any)"
    )
    record_exit_code(code)
    os._exit(code)


def install_startup_handlers() -> dict:
    """From the CLI's start until the trainer installs its own (and again once it is done);
    returns the handlers they replace."""
    return {s: signal.signal(s, _exit_at_start_up) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}


def restore_handlers(saved: dict) -> None:
    for s, h in saved.items():
        signal.signal(s, h)


def ignore_while_ending(interrupt: bool = True) -> None:
    """The run has its exit code: a signal while the process group is torn down must not change
    it (a launcher's SIGTERM to the job when the first rank exits would make it 143).
    `interrupt`: Ctrl-C too."""
    for s in (signal.SIGTERM, signal.SIGUSR1, *((signal.SIGINT,) if interrupt else ())):
        signal.signal(s, signal.SIG_IGN)


def notice_stop(signum: int) -> None:
    """Said once, from the signal handler (os.write: safe there), when a stop is requested."""
    if signum == signal.SIGINT:
        _say("[tokentrain] Ctrl-C: stopping after this step and writing a checkpoint (Ctrl-C again to abort at once)")


def abort_now(signum: int) -> None:
    """A second Ctrl-C: leave now, through the CLI's KeyboardInterrupt path (exit 130)."""
    raise KeyboardInterrupt


def _say(text: str) -> None:
    try:
        os.write(2, (text + "\n").encode())
    except OSError:
        pass
