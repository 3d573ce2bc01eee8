"""Trainer overhead: tokentrain vs a minimal hand-written PyTorch loop, same model, same batches.

For each (model size, dtype) both loops train the same Llama (random init from one
seed) on the same packed batches of `max_length` tokens, alternating rounds (A B B A ...) in one
process so that machine noise hits both alike. Reported: tokens/s of each from its
fastest step (on a shared machine other processes only ever add time) and from its
median step, and the ratios (tokentrain / bare; target >= 0.97).

* tokentrain: the real `Trainer` (StepStream + DataLoader, masking probe, fused chunked
  loss, global target count, clipping, AdamW, metrics JSONL/progress bar). Its step time is
  the spacing of consecutive `elapsed` stamps in metrics.jsonl (log_interval=1), so every
  per-step cost -- data, logging, bookkeeping -- is inside it.
* bare: `model(input_ids, position_ids, use_cache=False)` (transformers' own packed-sequence
  masking), fp32 cross-entropy over the full logits / target count, backward, clip, AdamW.
  Its batches are prepared in memory beforehand (no data loading at all).

Also measured: seconds from `tokentrain train` (a fresh process) to the first finished
step of the tiny_demo template.

    .venv/bin/python bench/train_overhead.py [--quick] [--sizes 10M,50M] [--dtypes fp32,bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
SIZES = {  # name: (vocab, hidden, layers, heads, intermediate)
    "10M": (8192, 256, 8, 8, 688),
    "50M": (16384, 512, 10, 8, 1376),
}


def build_model_folder(out: Path, size: str) -> int:
    from transformers import AutoModelForCausalLM

    from tokentrain.model.tiny import llama_config, make_tokenizer

    vocab, hidden, layers, heads, inter = SIZES[size]
    cfg = llama_config(vocab, hidden, layers, heads, intermediate_size=inter, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out)
    make_tokenizer(vocab).save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def tokentrain_run(model_dir: Path, data: Path, work: Path, max_length: int, steps: int, dtype: str) -> list[float]:
    """Per-step seconds of the real trainer (after its first step)."""
    from tokentrain.config.loader import build_config
    from tokentrain.distributed.env import DistEnv
    from tokentrain.training.trainer import Trainer

    cfg = build_config(
        dict(
            pretrained_model_name_or_path=str(model_dir),
            dataset_folder=str(data),
            max_length=max_length,
            batch_size=1,
            accumulative_counts=1,
            dataloader_num_workers=1,
            max_iters=steps,
            lr=1e-4,
            save_steps=10**6,
            evaluation_inputs=[],
            log_interval=1,
            tensorboard=False,
            dtype=dtype,
            seed=0,
        ),
        "<bench>",
    )
    t = Trainer(cfg.replace(work_dir=str(work)), DistEnv(0, 1, 0, 1, torch.device("cpu"), "gloo"), work)
    t.setup()
    t.fit()
    stamps = [json.loads(line)["elapsed"] for line in (work / "metrics.jsonl").read_text().splitlines()]
    return [b - a for a, b in zip(stamps, stamps[1:])]


def bare_run(model_dir: Path, batches: list, steps: int, dtype: str) -> list[float]:
    """Per-step seconds of a minimal loop (after its first step) on the same batches."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01, foreach=True)
    amp = dtype == "bfloat16"
    times, last = [], time.perf_counter()
    for step in range(steps):
        ids, labels, pos = batches[step % len(batches)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        n = (labels != -100).sum()
        loss = (
            F.cross_entropy(
                logits.float().view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100, reduction="sum"
            )
            / n
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times[1:]


def same_batches(data: Path, max_length: int, n: int, seed: int = 0) -> list:
    """The first n micro-batches tokentrain's sampler gives a 1-rank, batch-1 run with this seed."""
    from tokentrain.data.batch import collate
    from tokentrain.data.dataset import DataSettings, build_dataset
    from tokentrain.data.sampler import ResumableSampler

    ds = build_dataset(DataSettings(folder=str(data), max_length=max_length, seed=seed))
    order = list(ResumableSampler(len(ds), 0, 1, seed=seed, shuffle=True))[:n]
    out = []
    for k in order:
        b = collate([ds[k]])
        out.append((b.input_ids, b.labels, b.position_ids))
    return out


def time_to_first_step(tmp: Path) -> float:
    """Wall seconds from starting `tokentrain train` (tiny_demo template) to its first step record."""
    from tokentrain.data.synth import synth_dataset

    data = tmp / "demo_data"
    synth_dataset(data, files=2, documents=400, seed=0, mean_length=200, vocab_size=768)
    cfg = tmp / "tiny_demo_copy.py"
    subprocess.run(
        [sys.executable, "-m", "tokentrain", "copy-cfg", "tiny_demo", str(tmp)], check=True, capture_output=True
    )
    text = (
        cfg.read_text()
        .replace("'demo/tiny-llama'", repr(str(ROOT / "demo" / "tiny-llama")))
        .replace("'demo_out/data'", repr(str(data)))
    )
    cfg.write_text(text)
    work = tmp / "demo_work"
    env = dict(os.environ, TOKENTRAIN_CACHE=str(tmp / "cache"))
    # build the index once, as a second run of the same data would find it
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tokentrain",
            "train",
            str(cfg),
            "--work-dir",
            str(work),
            "--cfg-options",
            "log_interval=1",
            "max_iters=3",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = work / "metrics.jsonl"
    while proc.poll() is None and not (metrics.is_file() and metrics.read_text().strip()):
        time.sleep(0.01)
    first = time.perf_counter() - t0
    proc.wait()
    return first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10M,50M")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per round (plus one warm-up step)")
    ap.add_argument("--rounds", type=int, default=4, help="tokentrain/bare rounds, in A B B A order")
    ap.add_argument("--quick", action="store_true", help="10M fp32 only, 3 steps, 1 round")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.dtypes, args.steps, args.rounds = "10M", "fp32", 3, 1
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    dt_names = {"fp32": "float32", "bf16": "bfloat16"}
    results = []
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        os.environ["TOKENTRAIN_CACHE"] = str(tmp / "cache")
        print(
            f"# torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
            f"{platform.processor() or platform.machine()}, load avg {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        ttfs = time_to_first_step(tmp)
        print(f"time from `tokentrain train` (tiny_demo) to first finished step: {ttfs:.2f} s", flush=True)
        for size in args.sizes.split(","):
            model_dir = tmp / f"llama-{size}"
            n_params = build_model_folder(model_dir, size)
            data = tmp / f"data-{size}"
            from tokentrain.data.synth import synth_dataset

            synth_dataset(data, files=2, documents=400, seed=0, mean_length=562, vocab_size=SIZES[size][0])
            batches = same_batches(data, args.max_length, args.steps + 1)
            for dt in args.dtypes.split(","):
                tt, bare = [], []
                for r in range(args.rounds):  # A B B A ...: drift and noise hit both alike

                    def run_tokentrain(r=r, dt=dt, tt=tt, model_dir=model_dir, data=data, size=size):
                        tt.extend(
                            tokentrain_run(
                                model_dir,
                                data,
                                tmp / f"w-{size}-{dt}-{r}",
                                args.max_length,
                                args.steps + 1,
                                dt_names[dt],
                            )
                        )

                    def run_bare(dt=dt, bare=bare, model_dir=model_dir, batches=batches):
                        bare.extend(bare_run(model_dir, batches, args.steps + 1, dt_names[dt]))

                    runs = [run_tokentrain, run_bare]
                    for run in runs if r % 2 == 0 else runs[::-1]:
                        run()
                # Other processes on a shared machine only ever add time: the fastest steps are the
                # best estimate of each loop's own cost; the medians are reported beside them.
                best_tt, best_bare = args.max_length / min(tt), args.max_length / min(bare)
                med_tt, med_bare = args.max_length / statistics.median(tt), args.max_length / statistics.median(bare)
                row = dict(
                    size=size,
                    params=n_params,
                    dtype=dt,
                    max_length=args.max_length,
                    steps_each=len(tt),
                    tokentrain_tok_s=round(best_tt, 1),
                    bare_tok_s=round(best_bare, 1),
                    ratio=round(best_tt / best_bare, 3),
                    median_tokentrain_tok_s=round(med_tt, 1),
                    median_bare_tok_s=round(med_bare, 1),
                    median_ratio=round(med_tt / med_bare, 3),
                    load_avg=round(os.getloadavg()[0], 2),
                )
                results.append(row)
                print(
                    f"{size} ({n_params / 1e6:.1f}M params) {dt} L={args.max_length}: best step tokentrain "
                    f"{best_tt:.0f} tok/s, "
                    f"bare {best_bare:.0f} tok/s, ratio {best_tt / best_bare:.3f} | median {med_tt:.0f} vs "
                    f"{med_bare:.0f}, "
                    f"ratio {med_tt / med_bare:.3f} | load avg {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps({"time_to_first_step_s": ttfs, "results": results}, indent=2))


if __name__ == "__main__":
    main()
