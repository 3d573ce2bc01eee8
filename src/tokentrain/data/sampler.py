"""Which samples each data-parallel rank sees, in which order, and where to resume.

Every epoch is a fresh permutation from ``(seed, epoch)``, trimmed to a multiple of the
world size, and rank r takes every world-th sample starting at r. Striding (rather than
contiguous blocks) means the union over ranks of the i-th micro-batches is the same run
of the permutation whatever the world size: the *global* batch of a step does not depend
on how it is split across ranks, micro-batches and accumulation.

Resume: the trainer calls ``advance(n)`` for samples it has really consumed (DataLoader
workers prefetch ahead, so counting what was yielded would be wrong); ``state_dict``
records epoch and position, and iteration restarts at exactly the next sample.

``StreamSampler`` is the same over an unbounded stream whose order is already decided
(a data mixture): epoch e is positions [e*n, (e+1)*n), strided across ranks the same way.
"""

from __future__ import annotations

import numpy as np


class ResumableSampler:
    def __init__(
        self,
        num_samples: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        relaxed: bool = False,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in world of {world_size}")
        if num_samples < world_size:
            from tokentrain.errors import DataError

            raise DataError(
                f"only {num_samples} samples for {world_size} data-parallel ranks; use more data or fewer ranks"
            )
        self.num_samples = num_samples
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.relaxed = relaxed  # the user let a change of the data go on (resume_ignore)
        self.epoch = 0
        self.consumed = 0  # samples of this epoch already consumed by this rank

    def __len__(self) -> int:
        """Samples per rank per epoch."""
        return self.num_samples // self.world_size

    def order(self, epoch: int) -> np.ndarray:
        """This rank's sample ids for an epoch."""
        n = len(self) * self.world_size
        perm = (
            np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            if self.shuffle
            else np.arange(self.num_samples)
        )
        return perm[:n][self.rank :: self.world_size]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def advance(self, n: int) -> None:
        self.consumed += n

    def __iter__(self):
        ids = self.order(self.epoch)
        return iter(ids[self.consumed :].tolist())

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint of another sample stream is refused, unless `relaxed` (the user let a
        change of the data go on, `resume_ignore`): then the new stream goes on at the same
        epoch and the same fraction of it."""
        mine = getattr(self, "fingerprint", "")
        same = state.get("stream", "") == mine and (state["num_samples"], state["seed"]) == (
            self.num_samples,
            self.seed,
        )
        if self.relaxed and not same:
            done = state["consumed"] * state["world_size"] / max(1, state["num_samples"])  # of the epoch
            self.epoch, self.consumed = state["epoch"], min(len(self), int(done * self.num_samples) // self.world_size)
            import logging

            logging.getLogger("tokentrain.train").warning(
                "the sample stream changed (resume_ignore): going on at epoch %d, %.1f%% into it; samples of the "
                "new stream before that point are not seen this epoch",
                self.epoch,
                100 * done,
            )
            return
        if state.get("stream", "") != mine:
            from tokentrain.errors import DataError

            raise DataError(
                f"checkpoint was taken on the data {state.get('stream') or 'of one dataset_folder'!r}, this run "
                f"reads {mine or 'one dataset_folder'!r}: the datasets or their weights changed; "
                "resume with the same data"
            )
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed:
            from tokentrain.errors import DataError

            raise DataError(
                f"checkpoint was taken on {state['num_samples']} samples (seed {state['seed']}), "
                f"this run has {self.num_samples} (seed {self.seed}): the data or its settings changed; "
                "resume with the same data"
            )
        if state["world_size"] != self.world_size:
            # Same global position, re-split: ranks consumed equal shares, so the global
            # count divides evenly across the new world as long as it is a multiple.
            global_pos = state["consumed"] * state["world_size"]
            if global_pos % self.world_size:
                from tokentrain.errors import DataError

                raise DataError(
                    f"cannot resume position {global_pos} on {self.world_size} ranks; resume on "
                    f"{state['world_size']} ranks"
                )
            self.epoch, self.consumed = state["epoch"], global_pos // self.world_size
            return
        self.epoch, self.consumed = state["epoch"], state["consumed"]


class StreamSampler(ResumableSampler):
    """Positions of an ordered, unbounded stream (``MixtureDataset``): no permutation here (the
    stream is already a seeded interleave); each epoch continues where the last one ended.
    ``fingerprint`` names the stream (sources and weights): a checkpoint of another mixture
    is refused rather than resumed at a position that means something else."""

    def __init__(
        self,
        num_samples: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        fingerprint: str = "",
        relaxed: bool = False,
    ):
        super().__init__(num_samples, rank, world_size, seed, shuffle=False, relaxed=relaxed)
        self.fingerprint = fingerprint

    def order(self, epoch: int) -> np.ndarray:
        n = len(self) * self.world_size
        return (np.arange(n, dtype=np.int64) + epoch * self.num_samples)[self.rank :: self.world_size]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "stream": self.fingerprint}
