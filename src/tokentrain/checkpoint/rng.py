"""Every rank's RNG states (torch, CUDA, numpy, python) as tensors and plain lists, so a
checkpoint's `rng_rank{R}.pt` loads with `torch.load(weights_only=True)`."""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    # numpy's stub types the default call as the dict form; legacy=True (the runtime default)
    # gives MT19937's tuple for the global generator
    mt = np.random.get_state(legacy=True)
    assert isinstance(mt, tuple)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": mt[0],
            "keys": torch.from_numpy(mt[1].astype(np.int64)),
            "pos": int(mt[2]),
            "has_gauss": int(mt[3]),
            "cached_gaussian": float(mt[4]),
        },
        "python": _py_state_to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_lists(s):
    version, internal, gauss = s
    return [version, list(internal), gauss]
