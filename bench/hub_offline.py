"""How long `tokentrain train` takes to refuse a hub id it cannot have (docs/benchmarks.md, "Hub id
without network"): the hub endpoint a closed local port (refused), a port whose backlog is full
(a connect that never answers, as behind a firewall), and HF_HUB_OFFLINE=1 with an empty cache;
`tokentrain --version` is the start-up floor. Wall seconds of the whole process, median and max.

    .venv/bin/python bench/hub_offline.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(argv: list[str], env: dict) -> tuple[float, int]:
    t0 = time.monotonic()
    r = subprocess.run(argv, env=env, capture_output=True, text=True)
    return time.monotonic() - t0, r.returncode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    filler = socket.create_connection(silent.getsockname(), timeout=5)  # the one backlog slot
    tt = [sys.executable, "-m", "tokentrain"]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "run.py"
        cfg.write_text(f"pretrained_model_name_or_path = 'internlm/internlm-7b'\ndataset_folder = {tmp!r}\n")
        base = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
        base["HF_HOME"] = str(Path(tmp) / "hf_home")
        train = [*tt, "train", str(cfg), "--work-dir", str(Path(tmp) / "work")]
        cases = {
            "tokentrain --version (start-up)": ([*tt, "--version"], {}),
            "hub endpoint refuses": (train, {"HF_ENDPOINT": f"http://127.0.0.1:{closed.getsockname()[1]}"}),
            "hub endpoint silent": (train, {"HF_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}"}),
            "HF_HUB_OFFLINE=1, empty cache": (train, {"HF_HUB_OFFLINE": "1"}),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):  # interleaved: machine noise hits every case alike
            for name, (argv, extra) in cases.items():
                seconds, code = timed(argv, {**base, **extra})
                assert code == (0 if "version" in name else 2), (name, code)
                times[name].append(seconds)
    filler.close()
    print(f"$ {shlex.join([sys.executable, *sys.argv])}   ({args.rounds} rounds)")
    print(f"{'case':34} {'median s':>9} {'max s':>7}")
    for name, ts in times.items():
        print(f"{name:34} {statistics.median(ts):9.2f} {max(ts):7.2f}")


if __name__ == "__main__":
    main()
