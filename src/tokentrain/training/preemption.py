"""SIGTERM / SIGUSR1 / Ctrl-C: finish the step, checkpoint, exit 75 (the launcher retries);
a second Ctrl-C aborts at once (130, no traceback)."""

from __future__ import annotations

import signal

from tokentrain.run import signals as run_signals

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # SIGINT (Ctrl-C) stops like SIGTERM


class Preemption:
    """The signals set a flag; the loop reads it (summed over ranks) after each step."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def install(self) -> None:
        """Idempotent; installed from the start of setup, so a signal during model loading
        also ends in a checkpoint (after the first step) rather than a kill."""
        if self._old:
            return
        for s in PREEMPT_SIGNALS:
            self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, _frame) -> None:
        if signum == signal.SIGINT and self.signal is not None:  # a second Ctrl-C: abort now (130)
            run_signals.abort_now(signum)
        run_signals.notice_stop(signum)
        self.signal = signum

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def describe(self) -> str:
        return signal.Signals(self.signal).name if self.signal else "a signal on another rank"
