"""Where metrics go on rank 0: a progress bar on a terminal, log lines, and the sinks
(`metrics.jsonl` always; TensorBoard and Weights & Biases when asked for).

One record per logged step, the same dict everywhere. Log lines carry the time (and the
rank on multi-rank runs, see `log_prefix`) and an ETA, because under Slurm or nohup there
is no bar: the log file is all one sees.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections import deque
from pathlib import Path

from tokentrain.metrics.sinks import JsonlSink, Sink, TensorBoardSink, WandbSink, optional_sink

log = logging.getLogger("tokentrain.train")


def launcher_rank() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (torchrun or srun), before any process group."""
    world = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    rank = int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)
    return rank, world


def log_prefix() -> str:
    """'[tokentrain]', with ' rank R' on a multi-rank run (every rank's lines may share one log)."""
    rank, world = launcher_rank()
    return f"[tokentrain rank {rank}]" if world > 1 else "[tokentrain]"


def log_format(debug: bool) -> str:
    """The format of every log line: prefix, time, (level with --debug), message."""
    return f"{log_prefix()} %(asctime)s " + ("%(levelname)s " if debug else "") + "%(message)s"


LOG_DATEFMT = "%Y-%m-%d %H:%M:%S"


def _fmt_count(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def fmt_duration(s: float) -> str:
    s = round(s)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def format_record(r: dict, eta_s: float | None = None) -> str:
    parts = [f"step {r['step']}/{r['total_steps']}", f"epoch {r['epoch']:.3f}", f"loss {r['loss']:.4f}"]
    if "val_loss" in r:
        parts.append(f"val_loss {r['val_loss']:.4f}")
    parts += [f"lr {r['lr']:.3g}", f"grad_norm {r['grad_norm']:.3f}"]
    if "tokens_per_s" in r:
        parts.append(f"tok/s {r['tokens_per_s']:.0f}")
    if "target_tokens" in r:
        parts.append(f"targets {_fmt_count(r['target_tokens'])}")
    if "step_time" in r:
        parts.append(f"step {r['step_time']:.3f}s data {r['data_time']:.3f}s")
    if r.get("tflops") is not None:
        parts.append(f"TFLOP/s {r['tflops']:.3f}")
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    if "memory_gb" in r:
        parts.append(f"mem {r['memory_gb']:.2f}GB")
    if r.get("skipped_steps"):
        parts.append(f"skipped {r['skipped_steps']}")
    if eta_s is not None:
        parts.append(f"eta {fmt_duration(eta_s)}")
    return "  ".join(parts)


class ConsoleSink(Sink):
    """One log line per record, ending with the ETA at the pace of the recent steps.

    Why recent and not the run's average: the average carries the start-up (model load,
    compilation, the first steps' warm-up) and any slow patch long past, so on a long run it
    is wrong for hours. The pace is measured over the last `window` log records (evaluation and
    checkpoints in them included), from the start until that many exist."""

    def __init__(self, say, total_steps: int, start_step: int, window: int = 10, clock=time.perf_counter):
        self.say, self.total_steps, self.clock = say, total_steps, clock
        self.marks: deque[tuple[float, int]] = deque([(clock(), start_step)], maxlen=window + 1)

    def eta(self, step: int) -> float | None:
        now = self.clock()
        t_old, step_old = self.marks[0]
        self.marks.append((now, step))
        if step <= step_old:
            return None
        return (now - t_old) / (step - step_old) * max(0, self.total_steps - step)

    def write(self, record: dict) -> None:
        self.say(format_record(record, self.eta(record["step"])) if "total_steps" in record else str(record))


class MetricsLogger:
    def __init__(
        self,
        work_dir: Path,
        enabled: bool,
        total_steps: int,
        start_step: int,
        tensorboard: bool = True,
        wandb: bool = False,
        config: dict | None = None,
        interval: int = 1,
    ):
        self.enabled = enabled
        self.interval = interval
        self.bar = None
        self.sinks: list[Sink] = []
        if not enabled:
            return
        work_dir.mkdir(parents=True, exist_ok=True)
        self.console = ConsoleSink(self.message, total_steps, start_step)
        self.sinks.append(JsonlSink(work_dir / "metrics.jsonl", resume_step=start_step if start_step else None))
        if tensorboard:
            tb = optional_sink(
                "TensorBoard", "tensorboard", lambda: TensorBoardSink(work_dir / "tensorboard", start_step)
            )
            self.sinks += [tb] if tb else []
        if wandb:
            wb = optional_sink("Weights & Biases", "wandb", lambda: WandbSink(work_dir, config, resumed=start_step > 0))
            self.sinks += [wb] if wb else []
        from tqdm import tqdm

        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            disable=None,  # no bar outside a terminal: the log lines (with ETA) say it all
            leave=True,
        )

    def due(self, step: int, *, last: bool, forced: bool) -> bool:
        """Whether step `step` gets a record: every `interval` steps, the last one, and any
        step that evaluated or stops the run (`forced`)."""
        return step % self.interval == 0 or last or forced

    def advance(self, n: int = 1, loss: float | None = None) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if loss is not None and math.isfinite(loss):
                self.bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)

    def write(self, record: dict, echo: bool = True) -> None:
        """The record to every sink, and (``echo``) as a log line."""
        if not self.enabled:
            return
        for sink in self.sinks:
            sink.write(record)
        if echo:
            self.console.write(record)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(f"{log_prefix()} {time.strftime(LOG_DATEFMT)} {text}", file=sys.stderr)
        else:
            log.info(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for sink in self.sinks:
            sink.close()
        self.sinks = []
