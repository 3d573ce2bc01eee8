"""`data index` / `stats` / `check` on long work: periodic progress lines outside a terminal
(moving inside a large file, not once per file) and a closing summary with throughput."""

from __future__ import annotations

import re

import numpy as np

from .helpers import tt, write_bin

LINE = r"{}: (\d+\.\d) MB / (\d+\.\d) MB \((\d+\.\d)%\), ([\d,]+) records, \d+\.\d MB/s"
SUMMARY = r" in \d+\.\ds \(\d+\.\d MB, \d+\.\d MB/s, [\d,]+ records/s\)$"


def _tt(*argv, cache):
    return tt(*argv, cache=cache, TOKENTRAIN_PROGRESS_INTERVAL="0")


def test_index_stats_check_show_progress_and_a_summary(tmp_path, cache_dir):
    rng = np.random.default_rng(0)
    data = tmp_path / "d"
    write_bin(data / "big.bin", [rng.integers(1, 30000, 20) for _ in range(20000)], meta=False)
    write_bin(data / "small.bin", [[5, 6, 7]] * 10, meta=False)

    r = _tt("data", "index", data, cache=cache_dir)
    assert r.returncode == 0, r.stderr
    assert len(re.findall(LINE.format("index"), r.stderr)) == 2  # one per file (the meta is built whole)
    assert re.search("indexed 2 file\\(s\\)" + SUMMARY, r.stderr, re.M) and "wrote 2 meta file(s)" in r.stdout
    assert "big.bin.meta: 20000 lines" not in r.stderr  # no line per file any more

    # the metas tokentrain built recorded each file's summary: a check reads only those ...
    r = _tt("data", "check", data, cache=cache_dir)
    assert r.returncode == 0 and "checked 2 file(s): 0 problem(s) (2 unchanged since summarised" in r.stderr
    for cmd, summary, cache in (
        ("stats", "read 2 file\\(s\\), 20010 documents", cache_dir),
        ("check", "checked 2 file\\(s\\): 0 problem", tmp_path / "fresh"),  # ... so, to read them, a new cache
    ):
        r = _tt("data", cmd, data, cache=cache)
        assert r.returncode == 0, r.stderr
        found = re.findall(LINE.format(cmd), r.stderr)
        pcts = [float(f[2]) for f in found]
        assert len([p for p in pcts if 0 < p < 99]) >= 4, pcts  # 20000 lines: updates inside big.bin
        assert pcts == sorted(pcts) and int(found[-1][3].replace(",", "")) == 20010
        assert re.search(summary + ".*" + SUMMARY, r.stderr, re.M), r.stderr[-500:]
        assert "\r" not in r.stderr
