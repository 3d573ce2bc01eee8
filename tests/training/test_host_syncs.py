"""No host sync per micro-batch: a training step reads from the device a fixed number of
times however many micro-batches it accumulates (a read of a GPU tensor stalls the host until
the GPU has caught up, so one per micro-batch would serialise host and GPU).

On CPU nothing syncs, so the reads are counted where they would: every op that makes the host
wait for a device tensor's value (`.item()`/`float()`/`bool()`, `nonzero`, `unique`, ...) seen
by a dispatch mode, and `tolist`, during `Trainer.fit`, through the CUDA default path (varlen
attention: PyTorch's kernel replaced by a one-call stand-in that reads nothing back, as the
kernel does). Two reads are not counted because they touch host tensors only on a GPU:
AdamW's step counters (CPU tensors unless capturable or fused) and the stand-in itself.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tokentrain.model.varlen as varlen
from tests.helpers import local_env, make_config
from tests.model import varlen_standins
from tokentrain.training.trainer import Trainer

aten = torch.ops.aten
# Ops whose result (a value or a size) the host must wait for.
SYNC_OPS = {
    aten._local_scalar_dense.default,  # item(), float(t), int(t), bool(t)
    aten.nonzero.default,
    aten.unique_consecutive.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.masked_select.default,
    aten.is_nonzero.default,
    aten.equal.default,
}
HOST_ONLY_ON_GPU = ("/torch/optim/", "varlen_standins.py")


def _where() -> str | None:
    """The innermost frame of the read outside torch; None when it is one of HOST_ONLY_ON_GPU."""
    frames = traceback.extract_stack()[:-3]
    if any(part in f.filename for f in frames for part in HOST_ONLY_ON_GPU):
        return None
    outside = [f for f in frames if "/torch/" not in f.filename]
    f = outside[-1] if outside else frames[-1]
    return f"{Path(f.filename).name}:{f.lineno} {f.name}"


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS:
            self.note()
        return func(*args, **(kwargs or {}))

    def note(self) -> None:
        where = _where()
        if where is not None:
            self.seen.append(where)


@pytest.fixture
def one_call_kernel(monkeypatch):
    monkeypatch.setattr(varlen, "KERNEL", varlen.KernelCall.of(varlen_standins.one_call))
    monkeypatch.setattr(varlen, "STANDIN", True)


def host_reads(tiny_model, tiny_data, work: Path, monkeypatch, steps: int, acc: int) -> list[str]:
    cfg = make_config(
        tiny_model,
        tiny_data,
        max_iters=steps,
        batch_size=1,
        accumulative_counts=acc,
        attn_implementation="varlen",
        work_dir=str(work),
    )
    trainer = Trainer(cfg, local_env(), work, None)
    trainer.setup()
    assert trainer.module.masking.mode == "varlen"
    reads = HostReads()
    tolist = torch.Tensor.tolist

    def counted_tolist(t):
        reads.note()
        return tolist(t)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    with reads:
        assert trainer.fit() == 0
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    return reads.seen


def test_a_step_reads_the_device_a_fixed_number_of_times_whatever_its_micro_batches(
    tiny_model, tiny_data, tmp_path, monkeypatch, one_call_kernel
):
    one = host_reads(tiny_model, tiny_data, tmp_path / "a1", monkeypatch, steps=2, acc=1)
    four = host_reads(tiny_model, tiny_data, tmp_path / "a4", monkeypatch, steps=2, acc=4)
    assert sorted(four) == sorted(one), "reads per micro-batch:\n" + "\n".join(sorted(set(four) ^ set(one)))
    longer = host_reads(tiny_model, tiny_data, tmp_path / "a1_4", monkeypatch, steps=4, acc=1)
    per_step = (len(longer) - len(one)) / 2
    # the gradient norm (the engine skips a non-finite update) and the step's loss sum
    assert per_step <= 2, sorted(longer)
