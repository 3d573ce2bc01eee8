"""Tokens seen per mixture source, summed over ranks and kept across a resume.

Each batch carries its real tokens per source (``Batch.source_tokens``, from the samples'
``source``); the trainer adds ``local(micro)`` to the step's all-reduce and hands the summed
values back to ``add`` -- one collective for everything, as before."""

from __future__ import annotations


class SourceTokens:
    def __init__(self, names: list[str] | None):
        self.names = list(names or [])
        self.total = dict.fromkeys(self.names, 0)

    def local(self, micro: list) -> list[float]:
        """This rank's real tokens per source in a step's micro-batches, in a fixed order."""
        if not self.names:
            return []
        acc = dict.fromkeys(self.names, 0)
        for m in micro:
            for name, n in (m.batch.source_tokens or {}).items():
                acc[name] += n
        return [float(acc[n]) for n in self.names]

    def add(self, summed: list[float]) -> None:
        for name, v in zip(self.names, summed):
            self.total[name] += int(v)

    def record(self) -> dict:
        return {f"tokens/{n}": v for n, v in self.total.items()}

    def state_dict(self) -> dict:
        return dict(self.total)

    def load_state_dict(self, state: dict | None) -> None:
        for name, v in (state or {}).items():
            if name in self.total:
                self.total[name] = int(v)
