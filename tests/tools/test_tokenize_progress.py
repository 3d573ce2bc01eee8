"""Tokenize progress outside a terminal: periodic lines in bytes that move within one large
file (not once per file), with records, rate and ETA, with one worker and with several."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOK = str(ROOT / "demo" / "tiny-llama")
LINE = re.compile(
    r"tokenize: (\d+\.\d) MB / (\d+\.\d) MB \((\d+\.\d)%\), ([\d,]+) records, \d+\.\d MB/s(, eta \d+m\d\ds)?$"
)


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_moves_within_one_large_file(tmp_path, workers):
    big = tmp_path / "big.jsonl"
    with open(big, "w") as f:
        for i in range(2500):
            f.write(json.dumps({"text": f"document {i} " + "lorem ipsum dolor sit amet " * 8}) + "\n")
    size = big.stat().st_size
    env = dict(os.environ, TOKENTRAIN_PROGRESS_INTERVAL="0")  # a line at every update
    r = subprocess.run(
        [sys.executable, "-m", "tokentrain", "tokenize", str(big), "--tokenizer", TOK, "--out", str(tmp_path / "o"),
         "--workers", str(workers)],
        capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    found = [LINE.search(ln) for ln in r.stderr.splitlines()]
    found = [m for m in found if m]
    pcts = [float(m.group(3)) for m in found]
    inside = [p for p in pcts if 0 < p < 100]
    assert len(inside) >= 10, pcts[:20]  # many updates strictly inside the single file
    assert pcts == sorted(pcts) and pcts[-1] == 100.0
    assert float(found[0].group(2)) == round(size / 1e6, 1)
    records = [int(m.group(4).replace(",", "")) for m in found]
    assert records == sorted(records) and records[-1] == 2500
    assert all(m.group(5) for m in found if float(m.group(3)) < 100)  # an ETA while work is left
    assert "\r" not in r.stderr  # no bar redraws in a log
    assert "tokenized 2500 documents" in r.stdout and "MB/s" in r.stdout
