"""Progress of long data work (tokenize, data index/stats/check) that one can watch anywhere.

On a terminal: a tqdm bar in bytes. Elsewhere (Slurm, nohup, a pipe): one log line every
``interval`` seconds (TOKENTRAIN_PROGRESS_INTERVAL, default 30) with done/total, percent,
records, rate and ETA -- a 1 TB corpus is hours of work, and a bar redrawn with carriage
returns is unreadable in a log file. ``summary()`` is the closing line with throughput.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from tokentrain.metrics.logger import fmt_duration

log = logging.getLogger("tokentrain")


def _mb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


class Progress:
    def __init__(self, total_bytes: int, desc: str, enabled: bool = True, interval: float | None = None):
        self.total, self.desc = int(total_bytes), desc
        self.done = 0
        self.records = 0
        self.t0 = self.last = time.perf_counter()
        self.interval = float(os.environ.get("TOKENTRAIN_PROGRESS_INTERVAL", "30")) if interval is None else interval
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit="B", unit_scale=True, desc=desc, leave=False, file=sys.stderr)

    def update(self, nbytes: int, records: int = 0) -> None:
        self.done += int(nbytes)
        self.records += int(records)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(int(nbytes))
            return
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            log.info("%s", self.line())

    def line(self) -> str:
        """'desc: done / total (pct), N records, rate, eta' for a log file."""
        secs = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.done / secs
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 else None
        return (
            f"{self.desc}: {_mb(self.done)} / {_mb(self.total)} ({pct:.1f}%), {self.records:,} records, "
            f"{rate / 1e6:.1f} MB/s" + (f", eta {fmt_duration(eta)}" if eta is not None else "")
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def summary(self, what: str) -> str:
        """The closing line: what was done, in how long, at what throughput."""
        secs = max(self.seconds, 1e-9)
        rate = f"{self.done / secs / 1e6:.1f} MB/s, {self.records / secs:,.0f} records/s"
        return f"{what} in {secs:.1f}s ({_mb(self.done)}, {rate})"
