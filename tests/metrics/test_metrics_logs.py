"""Logs a cluster keeps: under nohup (no TTY) every line has the time, training lines an ETA,
and the logged loss is the token-weighted mean of the log window."""

from __future__ import annotations

import json
import re

import pytest

from tokentrain.metrics.logger import ConsoleSink, format_record, log_format, log_prefix

from .conftest import train_detached, write_cfg

LINE = re.compile(r"^\[tokentrain\] \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S")
STEP = re.compile(r"^\[tokentrain\] [\d-]+ [\d:]+ step (\d+)/8 .*loss (\d+\.\d+) .*eta (\d+)m(\d\d)s$")


def _metrics(work):
    return [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_a_run_without_terminal_logs_time_eta_and_the_window_mean_loss(tiny, tmp_path):
    model, data = tiny
    cfg = write_cfg(tmp_path / "run.py", model, data)
    assert train_detached(cfg, tmp_path / "w", tmp_path / "nohup.out", TOKENTRAIN_CACHE=str(tmp_path / "c")) == 0
    lines = (tmp_path / "nohup.out").read_text().splitlines()
    ours = [ln for ln in lines if ln.startswith("[tokentrain]")]
    assert ours and all(LINE.match(ln) for ln in ours), [ln for ln in ours if not LINE.match(ln)][:3]
    assert not any("\r" in ln or "it/s]" in ln for ln in lines)  # no progress bar in a log file
    steps = [STEP.match(ln) for ln in ours if STEP.match(ln)]
    assert [int(m.group(1)) for m in steps] == [4, 8]
    assert int(steps[-1].group(3)) == 0 and int(steps[-1].group(4)) == 0  # nothing left at the end
    recs = _metrics(tmp_path / "w")
    assert [r["step"] for r in recs] == [4, 8]
    assert [float(m.group(2)) for m in steps] == [round(r["loss"], 4) for r in recs]

    # The same run logging every step: the window-4 loss is the token-weighted mean of its 4 steps.
    every = write_cfg(tmp_path / "every.py", model, data, log_interval=1)
    assert train_detached(every, tmp_path / "e", tmp_path / "e.out", TOKENTRAIN_CACHE=str(tmp_path / "c")) == 0
    each = _metrics(tmp_path / "e")
    for rec, window in zip(recs, (each[0:4], each[4:8])):
        targets = sum(r["target_tokens"] for r in window)
        mean = sum(r["loss"] * r["target_tokens"] for r in window) / targets
        assert rec["loss"] == pytest.approx(mean, rel=1e-9)
        assert rec["loss_last"] == window[-1]["loss"]
        assert rec["loss"] != pytest.approx(rec["loss_last"], rel=1e-6)  # the mean is not the last value


def test_multi_rank_lines_name_their_rank(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert log_prefix() == "[tokentrain rank 3]" and log_format(False).startswith("[tokentrain rank 3] %(asctime)s")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert log_prefix() == "[tokentrain]"


def test_record_line_has_eta():
    r = dict(step=5, total_steps=10, epoch=0.5, loss=1.0, lr=1e-3, grad_norm=0.5)
    assert format_record(r, 3725.0).endswith("eta 1h02m") and "eta" not in format_record(r)


def test_eta_follows_the_recent_pace_not_the_runs_average():
    """A slow start (model load, compilation: 100 s for the first step), then 1 s a step: after
    the window has passed, the ETA is 1 s per remaining step, not the average's ~3 s."""
    now = [0.0]
    sink = ConsoleSink(lambda line: None, total_steps=1000, start_step=0, window=10, clock=lambda: now[0])
    now[0] = 100.0
    assert sink.eta(1) == pytest.approx(100.0 * 999)  # one step seen: its pace is all there is
    etas = []
    for step in range(2, 51):
        now[0] += 1.0
        etas.append(sink.eta(step))
    assert etas[-1] == pytest.approx(1.0 * 950)  # last 10 records: 1 s a step
    average = now[0] / 50 * 950
    assert average > 2.9 * etas[-1]
    # A resumed run counts from its start step.
    now[0] = 0.0
    resumed = ConsoleSink(lambda line: None, total_steps=100, start_step=90, clock=lambda: now[0])
    now[0] = 5.0
    assert resumed.eta(90) is None  # no step done yet: no ETA
    assert resumed.eta(95) == pytest.approx(5.0)  # 5 s for 5 steps, 5 left
