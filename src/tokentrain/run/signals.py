"""Signals of `tokentrain train`, and the exit codes they end in (see docs/reliability.md).

* During start-up (config, imports, process group; before the trainer's setup) nothing has
  been written yet: SIGTERM/SIGUSR1 end the process at once with 75 (preempted: start it
  again), SIGINT (Ctrl-C) with 130; one line each, no traceback.
* From the trainer's setup on, SIGTERM, SIGUSR1 and SIGINT all mean "stop after this step":
  a checkpoint is written, exit 75 (`--resume auto` continues). A second SIGINT aborts at
  once (exit 130, nothing saved since the last checkpoint).
"""

from __future__ import annotations

import os
import signal

from tokentrain.errors import EXIT_PREEMPTED

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class StartupSignal(BaseException):
    """SIGTERM/SIGUSR1 before training set up (a BaseException: no `except Exception` swallows it)."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        return (
            f"stopped by {signal.Signals(self.signum).name} during start-up, before training began; nothing was "
            "written; start it again (with --resume auto it continues from the last checkpoint, if any)"
        )


def _raise_startup(signum, _frame):
    raise StartupSignal(signum)


def install_startup_handlers() -> None:
    """SIGTERM/SIGUSR1 -> StartupSignal; SIGINT keeps Python's KeyboardInterrupt."""
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, _raise_startup)


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
