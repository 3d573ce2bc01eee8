"""Engine benchmark: seconds per step and peak RSS per rank for DDP, DeepSpeed ZeRO-1/2/3 and FSDP2.

A Llama built from a config (default ~134M parameters: vocab 32000, hidden 768, 12 layers,
MLP 2048, untied embeddings) trains a few steps on 2 gloo ranks on the CPU (fp32, batch 1 x
`--max-length` tokens per rank) under each engine, each engine in its own `torchrun`
launch running the real `Trainer`. Reported per engine:

* s/step: median `step_time` of the logged steps after the first (the first pays one-off
  allocations), and the first step's time;
* peak RSS per rank while training: `ru_maxrss` of each rank when the run reaches its first
  checkpoint (after the last step: `save_steps` > steps), so the final checkpoint and
  `hf/` export (FSDP2 gathers the whole model on rank 0 for it; ZeRO-3 on every rank) are
  not in it; and at exit ("whole run").

`fsdp2` loads the weights folder (whole on each rank, then sharded); `fsdp2_config` builds
the same model from its config alone, sharded as it is materialised -- the peak a
pretraining run from scratch sees. The DeepSpeed rows use the `--deepspeed` presets.

    .venv/bin/python bench/engines.py [--quick] [--engines ddp,fsdp2,...] [--steps 6] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENGINES = ["ddp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3", "fsdp2", "fsdp2_config"]
SIZES = {
    "full": dict(vocab=32000, hidden=768, layers=12, heads=12, mlp=2048),
    "quick": dict(vocab=512, hidden=64, layers=2, heads=4, mlp=256),
}


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- one rank (under torchrun)


def worker(out: Path, model: str, data: str, engine: str, steps: int, max_length: int) -> None:
    from tokentrain.config.loader import build_config
    from tokentrain.distributed.deepspeed_config import load_deepspeed_config
    from tokentrain.distributed.env import destroy_distributed, init_distributed
    from tokentrain.training.trainer import Trainer

    env = init_distributed("pytorch", timeout_s=600)
    settings = dict(
        pretrained_model_name_or_path=model,
        dataset_folder=data,
        max_length=max_length,
        batch_size=1,
        accumulative_counts=1,
        max_iters=steps,
        save_steps=10 * steps,
        evaluation_freq=10 * steps,
        evaluation_inputs=[],
        log_interval=1,
        tensorboard=False,
        dtype="float32",
        engine="fsdp2" if engine.startswith("fsdp2") else "auto",
    )
    cfg = build_config(settings, "<bench>")
    ds = load_deepspeed_config(engine) if engine.startswith("deepspeed") else None
    if ds is not None:  # the seed's ZeRO-3 needs deepspeed.comm up before it builds the model (issue 13)
        import deepspeed
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no ~1 min JIT build of a CPU comm op
        deepspeed.init_distributed(dist_backend=env.backend)
    work = out / "work"
    trainer = Trainer(cfg.replace(work_dir=str(work)), env, work, None, ds)
    marks = {"start": rss_mib()}
    save = trainer.save

    def save_once():  # the first checkpoint comes after the last step
        marks.setdefault("trained", rss_mib())
        save()

    trainer.save = save_once
    trainer.setup()
    marks["setup"] = rss_mib()
    assert trainer.fit() == 0
    destroy_distributed()
    marks["exit"] = rss_mib()
    (out / f"rss_rank{env.rank}.json").write_text(json.dumps(marks))


# --------------------------------------------------------------------------- driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(root: Path, size: dict) -> tuple[Path, Path, Path, int]:
    """Weights folder, config-only copy and data (reused when present); the parameter count."""
    from tokentrain.model.tiny import make_tiny_model

    model, config_only, data = root / "model", root / "config_only", root / "data"
    if not (model / "config.json").is_file():
        make_tiny_model(
            model, size["vocab"], size["hidden"], size["layers"], size["heads"], intermediate_size=size["mlp"]
        )
    if not config_only.is_dir():
        config_only.mkdir()
        for f in model.iterdir():
            if "safetensors" not in f.name:
                shutil.copy(f, config_only / f.name)
    if not data.is_dir():
        from tokentrain.data.synth import synth_dataset

        synth_dataset(data, files=2, documents=600, seed=3, mean_length=60, vocab_size=size["vocab"])
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), "pt") as f:
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (safe_open is not iterable)
    return model, config_only, data, n


def run_engine(root: Path, engine: str, model: Path, config_only: Path, data: Path, args) -> dict:
    out = root / "runs" / engine
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    folder = config_only if engine == "fsdp2_config" else model
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        __file__,
        "--worker",
        str(out),
        str(folder),
        str(data),
        engine,
        str(args.steps),
        str(args.max_length),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_"))}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        tail = [line for line in r.stderr.splitlines() if line.strip()][-1:] or ["?"]
        return {"engine": engine, "error": tail[0][:160], "wall": wall}
    rows = [json.loads(x) for x in (out / "work" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    times = [row["step_time"] for row in rows if "step_time" in row]
    rss = [json.loads((out / f"rss_rank{r}.json").read_text()) for r in (0, 1)]
    return {
        "engine": engine,
        "s_per_step": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "first_step": times[0],
        "rss_trained": [m.get("trained", m["exit"]) for m in rss],
        "rss_exit": [m["exit"] for m in rss],
        "wall": wall,
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        out, model, data, engine, steps, max_length = sys.argv[2:8]
        worker(Path(out), model, data, engine, int(steps), int(max_length))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny model: a smoke run of the script")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "tokentrain-bench-engines")
    p.add_argument("--timeout", type=int, default=900, help="seconds per engine")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    size = SIZES["quick" if args.quick else "full"]
    root = args.workdir / ("quick" if args.quick else "full")
    root.mkdir(parents=True, exist_ok=True)
    model, config_only, data, n = prepare(root, size)
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"model: Llama {n / 1e6:.1f}M parameters ({size}), fp32, 2 gloo ranks on CPU, "
        f"batch 1 x {args.max_length} tokens per rank, {args.steps} steps; load average {os.getloadavg()[0]:.1f}"
    )
    results = []
    for engine in args.engines.split(","):
        res = run_engine(root, engine, model, config_only, data, args)
        results.append(res)
        print(f"  {engine}: done in {res['wall']:.0f} s", flush=True)
    print()
    print(
        "| engine | s/step (median after the 1st) | 1st step s | peak RSS per rank, training (MiB) | "
        "peak RSS per rank, whole run (MiB) |"
    )
    print("|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['engine']} | failed: {r['error']} | | | |")
            continue
        print(
            f"| {r['engine']} | {r['s_per_step']:.2f} | {r['first_step']:.2f} | "
            f"{' / '.join(f'{x:.0f}' for x in r['rss_trained'])} | {' / '.join(f'{x:.0f}' for x in r['rss_exit'])} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"params": n, "size": size, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
