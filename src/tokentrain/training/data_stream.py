"""Micro-batches grouped into optimizer steps, epoch after epoch, resumable to the sample.

A step is `accumulative_counts` micro-batches of `batch_size` samples on every rank.
The sampler strides the epoch's permutation across ranks, so the samples of a step --
the union over ranks and micro-batches -- do not depend on how the global batch is split.
Incomplete steps at the end of an epoch are dropped. The trainer calls
`sampler.advance` after each finished step; a new DataLoader (and its iteration over the
sampler) starts at each epoch and at resume, exactly at the next unconsumed sample.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass

from tokentrain.data.batch import Batch, collate
from tokentrain.errors import DataError, TokentrainError
from tokentrain.metrics.flops import sum_sq_doc_lengths
from tokentrain.run.parent_watch import worker_init_fn


@dataclass
class MicroBatch:
    """One micro-batch of a step, with the counts the throughput and FLOP figures need."""

    batch: Batch
    real_tokens: int  # padding is not a real token
    sq_doc_lengths: int  # sum of squared document lengths (attention FLOPs)

    def pin_memory(self) -> MicroBatch:
        """Called by the DataLoader (pin_memory=True on CUDA): the batch in page-locked memory."""
        return MicroBatch(self.batch.pin_memory(), self.real_tokens, self.sq_doc_lengths)


def collate_with_stats(samples: list[dict]) -> MicroBatch:
    real = sum(len(s["input_ids"]) for s in samples)
    sq = sum(sum_sq_doc_lengths(s["cu_seqlens"]) for s in samples)
    return MicroBatch(collate(samples), real, sq)


def _worker_init(_worker_id: int) -> None:
    # Preemption signals are for the trainer (it checkpoints, then exits; workers die with it).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class StepStream:
    def __init__(
        self, dataset, sampler, batch_size: int, accumulative_counts: int, num_workers: int, pin_memory: bool = False
    ):
        self.dataset, self.sampler = dataset, sampler
        self.batch_size, self.acc = batch_size, accumulative_counts
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.samples_per_step = batch_size * accumulative_counts
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{len(sampler)} samples per rank per epoch, fewer than one step of batch_size * accumulative_counts = "
                f"{self.samples_per_step}; use more data, a smaller max_length, batch or accumulation"
            )

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sampler) // self.samples_per_step

    def epoch_progress(self) -> float:
        return self.sampler.epoch + self.sampler.consumed / max(1, self.steps_per_epoch * self.samples_per_step)

    def __iter__(self):
        import torch
        from torch.utils.data import DataLoader

        while True:
            remaining = (len(self.sampler) - self.sampler.consumed) // self.samples_per_step
            if remaining <= 0:
                self.sampler.set_epoch(self.sampler.epoch + 1)
                continue
            loader = DataLoader(
                self.dataset,
                batch_size=self.batch_size,
                sampler=self.sampler,
                collate_fn=collate_with_stats,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                drop_last=True,
                worker_init_fn=worker_init_fn(_worker_init) if self.num_workers else None,  # die with the rank
                # Its own generator: otherwise each new iterator draws a seed from the global RNG
                # and a resumed run's dropout stream would differ from an uninterrupted one.
                generator=torch.Generator().manual_seed(self.sampler.seed + self.sampler.epoch),
            )
            it = iter(loader)
            try:
                for _ in range(remaining):
                    yield [_next(it) for _ in range(self.acc)]
            finally:
                # Workers ignore SIGTERM (above), so the interpreter's exit could not end them:
                # stop them here, also when training stops on an error or the stream is closed.
                shutdown = getattr(it, "_shutdown_workers", None)
                if shutdown is not None:
                    shutdown()
            del it, loader
            self.sampler.set_epoch(self.sampler.epoch + 1)


_WORKER_ERROR = re.compile(r"^tokentrain\.errors\.\w+: (.*)$", re.M)


def _next(it):
    """next(it), with an error a DataLoader worker raised turned back into its own one line
    (torch re-raises it with "Caught ... in DataLoader worker" and the worker's traceback)."""
    try:
        return next(it)
    except TokentrainError as e:
        text = str(e)
        found = _WORKER_ERROR.findall(text) if text.startswith("Caught ") else None
        if found:
            raise type(e)(found[-1]) from None
        raise
