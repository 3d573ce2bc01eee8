"""How long `tokentrain plan` takes on a config-only 7B folder (target: under 10 s), through the
real command line in a fresh process each round: imports, the config, the data's index, the
model built on the meta device, the report.

    .venv/bin/python bench/plan_7b.py [--rounds 3] [--documents 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA_2_7B = dict(
    model_type="llama",
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--documents", type=int, default=20000)
    args = ap.parse_args()
    tt = [sys.executable, "-m", "tokentrain"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = dict(os.environ, TOKENTRAIN_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1")
        (root / "llama-7b").mkdir()
        (root / "llama-7b" / "config.json").write_text(json.dumps(LLAMA_2_7B))
        synth = [*tt, "data", "synth", str(root / "data"), "--files", "8", "--documents", str(args.documents)]
        subprocess.run(synth, env=env, check=True, capture_output=True)
        cfg = root / "cfg.py"
        cfg.write_text(
            f"pretrained_model_name_or_path = {str(root / 'llama-7b')!r}\ndataset_folder = {str(root / 'data')!r}\n"
        )
        for i in range(args.rounds):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            r = subprocess.run([*tt, "plan", str(cfg), "--world-size", "8", "--json"], env=env, capture_output=True)
            wall = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if r.returncode:
                print(r.stderr.decode()[-2000:], file=sys.stderr)
                return 1
            plan = json.loads(r.stdout)
            cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
            print(
                f"round {i + 1}: {wall:.2f} s wall, {cpu:.2f} s CPU; {plan['model']['params'] / 1e9:.2f} B parameters, "
                f"checkpoint {plan['disk']['checkpoint'] / 1e9:.1f} GB, export {plan['disk']['export'] / 1e9:.1f} GB"
            )
        print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPU(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
