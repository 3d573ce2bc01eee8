"""Where a metrics record goes: one small interface, one class per destination (the
console line is `logger.ConsoleSink`).

A sink has ``write(record)`` and ``close()``; the record is the same dict for all (what
``metrics.jsonl`` holds). ``JsonlSink`` owns the file's truncation on resume: the steps
after the checkpoint are repeated, so their old records are dropped before appending.
TensorBoard and Weights & Biases are optional extras (``pip install tokentrain[tensorboard]``
/ ``[wandb]``): asked for but missing, they are skipped with one warning and training goes on
(the JSONL file has everything).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger("tokentrain.train")


def scalars(record: dict) -> dict[str, float]:
    """The record's numbers (booleans, None and text left out), without the step itself."""
    return {
        k: v
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None
    }


class Sink:
    def write(self, record: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class JsonlSink(Sink):
    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None:
            truncate_jsonl(self.path, resume_step)
        self.f = open(self.path, "a")  # noqa: SIM115 (open for the run)

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()  # `tokentrain plot` and tests read it while training runs

    def close(self) -> None:
        self.f.close()


def truncate_jsonl(path: Path, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint: drop their old records (atomically)."""
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


class TensorBoardSink(Sink):
    def __init__(self, folder: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter  # ImportError without the tensorboard package

        self.tb = SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None)

    def write(self, record: dict) -> None:
        for k, v in scalars(record).items():
            self.tb.add_scalar(f"val/{k}" if k.startswith("val") else f"train/{k}", v, record["step"])

    def close(self) -> None:
        self.tb.close()


class WandbSink(Sink):
    """One W&B run per training run: its id is kept in WORK_DIR/wandb_run_id, so a resumed run
    (`resumed`: it continues from a checkpoint) continues it; any fresh start (a new work dir,
    `--overwrite`) gets a new id, else its steps 1.. would be logged over the old run's.
    Project from WANDB_PROJECT (default "tokentrain"); WANDB_MODE=offline writes the run under
    WORK_DIR/wandb for a later `wandb sync`, with no network."""

    def __init__(self, work_dir: Path, config: dict | None = None, resumed: bool = False):
        import wandb  # ImportError without the wandb extra

        id_file = work_dir / "wandb_run_id"
        old = id_file.read_text().strip() if id_file.is_file() else ""
        run_id = old if resumed and old else secrets.token_hex(4)
        if old and run_id != old:
            log.info("Weights & Biases: a new run %s (not resumed: the earlier run %s is left as it is)", run_id, old)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "tokentrain"),
            name=work_dir.resolve().name,
            dir=str(work_dir),
            id=run_id,
            resume="allow",
            config=config or {},
        )
        from tokentrain.utils.atomic import atomic_file

        with atomic_file(id_file, "w") as f:
            f.write(run_id + "\n")

    def write(self, record: dict) -> None:
        self.run.log(scalars(record), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


def optional_sink(what: str, extra: str, make) -> Sink | None:
    """``make()``, or None with one warning naming the extra when its package is missing or broken."""
    try:
        return make()
    except ImportError as e:
        log.warning("%s disabled: %s (pip install 'tokentrain[%s]'); metrics.jsonl has everything", what, e, extra)
    except Exception as e:  # a broken optional sink must not stop training
        log.warning("%s disabled: %s: %s; metrics.jsonl has everything", what, type(e).__name__, e)
    return None
