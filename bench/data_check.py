"""`tokentrain data check` throughput: GB of corpus checked per second of the whole command.

Generates a corpus of about --gb GB with `tokentrain data synth` (in a temporary folder,
deleted after), then times, each as a fresh process with its own empty TOKENTRAIN_CACHE
unless said:

* before: `data check DIR` of git revision --baseline (default main: its src/ exported with
  ``git archive``), the line-by-line check;
* after, first read: `data check DIR --model M` with 1 worker, then with --workers
  (default: the CPUs this process may use), each with an empty cache;
* after, cached: the same command again (the files unchanged: only their summaries read).

M is a folder with only a config.json (vocab_size 32000, the synth's). GB/s is the corpus
bytes over the command's wall seconds, process start (Python, numpy: ~0.3 s on an idle
machine) included; CPU seconds (the command's and its workers', from ``getrusage``) are the
figure a shared machine disturbs least; the check's own seconds (its closing line, 0.1 s resolution) are shown
beside it. The corpus was just written,
so it is in the page cache for every run (a cold disk reads slower). Target: >= 1 GB/s
cached.

    .venv/bin/python bench/data_check.py [--gb 1.0] [--files 16] [--workers N] [--baseline REV]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BYTES_PER_DOC = 3130  # synth's documents (mean 562 tokens, ids < 32000), json.dumps-spaced
TARGET_CACHED_GBPS = 1.0


def export_src(rev: str, out: Path) -> Path:
    """src/ of git revision `rev`, written under `out`."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(tar)) as t:
        t.extractall(out, filter="data")
    return out / "src"


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command and its worker processes
    return ru.ru_utime + ru.ru_stime


def timed(argv: list[str], src: Path, cache: Path) -> tuple[float, float, str, str]:
    """(wall seconds, CPU seconds, the command as one can paste it, its last stderr line)."""
    env = dict(os.environ, PYTHONPATH=str(src), TOKENTRAIN_CACHE=str(cache))
    t0, c0 = time.perf_counter(), _cpu()
    r = subprocess.run([sys.executable, "-m", "tokentrain", *argv], env=env, capture_output=True, text=True)
    secs, cpu = time.perf_counter() - t0, _cpu() - c0
    if r.returncode not in (0, 1):
        raise SystemExit(f"{shlex.join(argv)} failed ({r.returncode}): {r.stderr[-2000:]}")
    cmd = f"PYTHONPATH={src} TOKENTRAIN_CACHE={cache} {sys.executable} -m tokentrain {shlex.join(argv)}"
    return secs, cpu, cmd, r.stderr.strip().splitlines()[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="corpus size in GB (default 1.0)")
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--baseline", default="main", help="git revision timed as 'before' (default main)")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tokentrain-bench-check-") as tmp:
        work = Path(tmp)
        data, model = work / "corpus", work / "model"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 32000}))
        docs = int(a.gb * 1e9 / BYTES_PER_DOC)
        t0 = time.perf_counter()
        here = ROOT / "src"
        subprocess.run(
            [sys.executable, "-m", "tokentrain", "data", "synth", str(data), "--files", str(a.files)]
            + ["--documents", str(docs)],
            env=dict(os.environ, PYTHONPATH=str(here)),
            check=True,
            capture_output=True,
        )
        size = sum(p.stat().st_size for p in data.glob("*.bin"))
        print(f"corpus: {size / 1e9:.2f} GB in {a.files} files, {docs} documents ({time.perf_counter() - t0:.0f}s)")
        base = export_src(a.baseline, work / "baseline")
        check = ["data", "check", str(data)]
        new = [*check, "--model", str(model)]
        runs = [
            (f"before ({a.baseline}), line by line", check, base, work / "c0"),
            ("after, first read, 1 worker", [*new, "--workers", "1"], here, work / "c1"),
            (f"after, first read, {a.workers} workers", [*new, "--workers", str(a.workers)], here, work / "c2"),
            ("after, cached (files unchanged)", [*new, "--workers", str(a.workers)], here, work / "c2"),
        ]
        results = []
        for label, argv, src, cache in runs:
            secs, cpu, cmd, last = timed(argv, src, cache)
            own = float(re.search(r" in ([0-9.]+)s \(", last).group(1))  # type: ignore[union-attr]
            results.append(
                {
                    "run": label,
                    "seconds": secs,
                    "cpu_seconds": cpu,
                    "check_seconds": own,
                    "gb_per_s": size / 1e9 / secs,
                    "command": cmd,
                }
            )
            print(
                f"{label:>40}: {secs:8.2f} s  {size / 1e9 / secs:8.3f} GB/s (the check itself: {own:.1f} s; "
                f"CPU {cpu:.2f} s, {size / 1e9 / cpu:.3f} GB per CPU-second)\n"
                f"{'':>42}$ {cmd}\n{'':>42}{last}"
            )
        before, before_cpu = results[0]["seconds"], results[0]["cpu_seconds"]
        for r in results[1:]:
            print(
                f"{r['run']:>40}: {before / r['seconds']:.1f}x the 'before' wall speed, "
                f"{before_cpu / r['cpu_seconds']:.1f}x its CPU efficiency"
            )
        cached = results[-1]["gb_per_s"]
        verdict = "meets" if cached >= TARGET_CACHED_GBPS else "MISSES"
        print(f"cached: {cached:.2f} GB/s, {verdict} the target of >= {TARGET_CACHED_GBPS} GB/s")
        if a.json:
            Path(a.json).write_text(json.dumps({"bytes": size, "files": a.files, "runs": results}, indent=2))
    return 0 if cached >= TARGET_CACHED_GBPS else 1


if __name__ == "__main__":
    raise SystemExit(main())
