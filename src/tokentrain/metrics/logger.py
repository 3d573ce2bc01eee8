"""Where metrics go on rank 0: a progress bar, log lines, `metrics.jsonl`, TensorBoard.

One record per logged step, the same dict everywhere. `metrics.jsonl` is appended (a
resumed run continues the file) and flushed each line, so `tokentrain plot` and tests
read it while training runs.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

log = logging.getLogger("tokentrain.train")


def _fmt_count(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def format_record(r: dict) -> str:
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
    return "  ".join(parts)


class MetricsLogger:
    def __init__(
        self,
        work_dir: Path,
        enabled: bool,
        total_steps: int,
        start_step: int,
        tensorboard: bool = True,
        interval: int = 1,
    ):
        self.enabled = enabled
        self.interval = interval
        self.bar = None
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        work_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(work_dir / "metrics.jsonl", "a")  # noqa: SIM115 (open for the run)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(
                    str(work_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None
                )
            except Exception as e:  # TensorBoard missing or broken: the JSONL still has everything
                log.warning("TensorBoard disabled: %s", e)
        from tqdm import tqdm

        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            disable=None,
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
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                    self.tb.add_scalar(f"train/{k}" if not k.startswith("val") else f"val/{k}", v, step)
        if echo:
            self.message(format_record(record) if "total_steps" in record else json.dumps(record))

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(f"[tokentrain] {text}", file=sys.stderr)
        else:
            log.info(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def truncate_after(path: Path, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint: drop their old records."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            continue
    from tokentrain.utils.atomic import atomic_file

    with atomic_file(path, "w") as f:
        f.write("".join(k + "\n" for k in keep))
