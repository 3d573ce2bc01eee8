"""Metric sinks: a W&B offline run holds the same scalars as metrics.jsonl; optional sinks
that are missing warn once and training goes on; the JSONL sink truncates on resume."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tokentrain.metrics.sinks import JsonlSink, optional_sink, scalars

from .conftest import train_detached, write_cfg


def read_wandb_history(run_file: Path) -> list[dict]:
    """History rows of a .wandb file: a LevelDB-style log (7-byte file header, 32 KiB blocks of
    chunks: crc32 (4), length (2, LE), type (1: full, 2: first, 3: middle, 4: last)) of
    wandb Record protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buf, rows = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


@pytest.mark.slow
def test_wandb_offline_run_holds_the_scalars_of_metrics_jsonl(tiny, tmp_path):
    pytest.importorskip("wandb")  # the `wandb` extra (in the test extra, so present in CI)
    model, data = tiny
    cfg = write_cfg(tmp_path / "run.py", model, data, wandb=True, log_interval=2)
    work = tmp_path / "w"
    env = dict(WANDB_MODE="offline", WANDB_SILENT="true", TOKENTRAIN_CACHE=str(tmp_path / "c"))
    assert train_detached(cfg, work, tmp_path / "out.log", **env) == 0, (tmp_path / "out.log").read_text()[-3000:]
    (run_file,) = work.glob("wandb/offline-run-*/run-*.wandb")
    history = read_wandb_history(run_file)
    jsonl = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert len(jsonl) == 4
    got = [{k: v for k, v in h.items() if not k.startswith("_")} for h in history]
    assert [h["_step"] for h in history] == [r["step"] for r in jsonl]
    assert got == [scalars(r) for r in jsonl]
    assert (work / "wandb_run_id").read_text().strip() in run_file.name


def test_missing_optional_sink_warns_once_naming_the_extra(caplog):
    def make():
        raise ImportError("No module named 'tensorboard'")

    assert optional_sink("TensorBoard", "tensorboard", make) is None
    (msg,) = [r.getMessage() for r in caplog.records]
    assert "TensorBoard disabled" in msg and "pip install 'tokentrain[tensorboard]'" in msg


def test_jsonl_sink_truncates_the_steps_after_the_resumed_one(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7)) + "{torn")
    sink = JsonlSink(p, resume_step=4)
    sink.write({"step": 5, "loss": 2.0})
    sink.close()
    assert [json.loads(x)["step"] for x in p.read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert json.loads(p.read_text().splitlines()[-1])["loss"] == 2.0
    JsonlSink(p).close()  # not resumed: appended, nothing dropped
    assert len(p.read_text().splitlines()) == 5


def test_tensorboard_sink_writes_the_record_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tokentrain.metrics.sinks import TensorBoardSink

    sink = TensorBoardSink(tmp_path / "tb", start_step=0)
    for s in (1, 2):
        sink.write({"step": s, "loss": 1.0 / s, "val_loss": 2.0, "note": "text", "flag": True, "mfu": None})
    sink.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["train/loss", "val/val_loss"]
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 0.5)]
