"""SIGTERM / SIGUSR1: finish the step, checkpoint, exit 75 (the launcher retries)."""

from __future__ import annotations

import signal

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


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
