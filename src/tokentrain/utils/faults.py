"""Test-only fault injection, switched on by the ``TOKENTRAIN_FAULT_INJECT`` environment variable.

The reliability tests (tests/reliability) drive the real CLI and need faults that are
hard to provoke from outside at a precise moment. Unset (always, in real runs) every
hook is one dict lookup on an empty dict. The value is a comma-separated list of
``name=value`` items:

``nan_loss_at_step=N``     the loss of optimizer step N (1-based, as logged) is NaN
``inf_grad_at_step=N``     a gradient of step N is +inf (the loss stays finite)
``save_sleep=SECONDS``     sleep inside the checkpoint writer, after the weights are written
                           and before COMPLETE (to kill a process mid-write)
``save_enospc_at_step=N``  writing the checkpoint of step N fails with ENOSPC
``exit_sleep=SECONDS``     sleep once the exit code is decided and recorded, before the process
                           ends (to send a signal while it ends, as srun --kill-on-bad-exit does)
``skip_checkpoint_scan=1`` skip the pre-load check of checkpoint files (checkpoint/safety.py), to
                           prove that the process-wide weights-only loading refuses a payload alone
``rank=R``                 apply the step faults on rank R only (default: every rank)
"""

from __future__ import annotations

import os

ENV = "TOKENTRAIN_FAULT_INJECT"
KNOWN = (
    "nan_loss_at_step",
    "inf_grad_at_step",
    "save_sleep",
    "save_enospc_at_step",
    "exit_sleep",
    "skip_checkpoint_scan",
    "rank",
)


def parse(spec: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, _, value = item.partition("=")
        if name not in KNOWN:
            raise ValueError(f"{ENV}: unknown fault {name!r}; known: {', '.join(KNOWN)}")
        out[name] = value
    return out


FAULTS = parse(os.environ.get(ENV))


def at_step(name: str, step: int, rank: int = 0) -> bool:
    """Whether fault `name` fires at 1-based optimizer step `step` on `rank`."""
    if not FAULTS or name not in FAULTS:
        return False
    if "rank" in FAULTS and int(FAULTS["rank"]) != rank:
        return False
    return int(FAULTS[name]) == step


def value(name: str) -> str | None:
    return FAULTS.get(name) if FAULTS else None
