"""Training speed on one GPU: a plain transformers loop (the peer) against tokentrain's best path.

Run by bench/gpu_speed.sh (see there; the figures and their command: docs/benchmarks.md, "GPU
speed"). One run, within --budget seconds (default 290), each part in its own process under
its own timeout, so a part that fails (out of memory, a kernel that does not build) prints its
one-line reason in the table and the others still run:

  matmul            bf16 8192^3 matmul, TFLOP/s: the achievable peak MFU is also given against.
  peer-amp          a plain transformers loop -- LlamaForCausalLM(labels=ids), one causal mask
                    over the whole packed row (documents *not* kept apart), sdpa, fused AdamW,
                    fp32 master weights + bf16 autocast. Written here, no trainer.
  peer-bf16         the same with pure bf16 weights (no fp32 master).
  tokentrain        `tokentrain train` (the real trainer, as bench/gpu_check.py runs it) on its
                    best path: varlen attention (documents isolated), bf16 autocast, Liger's
                    kernels when importable (`kernels`), `compile` when the trainer has that key.
  tokentrain-torch  the same with kernels = 'torch': which wins, Liger or the compiler/PyTorch.
  8b-fsdp2          a Llama-3-8B-shaped model (config only) by the trainer under FSDP2 on the
                    one GPU, gradient checkpointing; then, if that did not fit,
  8b-offload        the same with fsdp_cpu_offload = True. Does it fit; tokens/s.

Shape: TinyLlama 1.1B (hidden 2048, 22 layers, 32 heads, 4 kv heads, intermediate 5632,
vocab 32000), 8192 tokens per packed row, batch 1; synthetic documents made on the spot (the
peer trains random ids of the same vocabulary: token values do not change the speed). Per
part: median tokens/s of the steps after --warmup, MFU against --peak-tflops (989: H100/H200
bf16 dense) and against the matmul measured here, peak memory (max_memory_allocated). Model
FLOPs per step as the trainer counts them (metrics/flops.py): 6 N per token plus attention
over what each run attends to -- the peer its whole row, tokentrain each document.

--tiny: small sizes on whatever device there is (CPU too): the plumbing, in < 2 minutes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import model_folder, train  # bench/ is not a package

# In the order they run: what the issue asks first, so a spent --budget skips the extras.
PARTS = ("matmul", "peer-amp", "tokentrain", "8b-fsdp2", "8b-offload", "peer-bf16", "tokentrain-torch")
TIMEOUTS = {"matmul": 30, "peer-amp": 90, "peer-bf16": 90, "tokentrain": 150, "tokentrain-torch": 150}
TIMEOUTS |= {"8b-fsdp2": 240, "8b-offload": 240}
RESULT = "RESULT "
LLAMA3_8B = dict(  # meta-llama/Meta-Llama-3-8B's config.json, the shape only
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    rope_theta=500000.0,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
)


def cuda() -> bool:
    return torch.cuda.is_available()


def peak_memory_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if cuda() else None


def matmul(a) -> dict:
    """Best of a few timed bf16 n^3 matmuls (CUDA events); on CPU a small fp32 one."""
    n = 512 if a.tiny else 8192
    dev, dt = ("cuda", torch.bfloat16) if cuda() else ("cpu", torch.float32)
    x = torch.randn(n, n, device=dev, dtype=dt)
    y = torch.randn(n, n, device=dev, dtype=dt)
    best = float("inf")
    for _ in range(3 if a.tiny else 20):
        t0 = time.perf_counter()
        x @ y
        if cuda():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return {"tflops": 2 * n**3 / best / 1e12, "note": f"{str(dt)[6:]} {n}^3, best of the timed runs"}


def inputs(a) -> tuple[Path, Path]:
    """The model folder (config only) and the synthetic packed data, made once per workdir."""
    from tokentrain.data.synth import synth_dataset

    work = Path(a.workdir)
    vocab = 512 if a.tiny else 32000
    model, data = work / "model", work / "data"
    if not (model / "config.json").exists():
        model_folder(model, a.tiny, vocab)
    if not data.exists():
        tokens = (a.steps + 4) * a.max_length
        mean = 60 if a.tiny else 1500
        synth_dataset(data, 1, max(2, int(tokens / mean * 1.3)), seed=0, mean_length=mean, vocab_size=vocab)
    return model, data


def peer(a, pure_bf16: bool) -> dict:
    """The plain loop a transformers user writes: no document isolation, HF's own loss."""
    import transformers as tf

    from tokentrain.metrics.flops import FlopCounter

    model_dir, _ = inputs(a)
    dev = torch.device("cuda" if cuda() else "cpu")
    dtype = torch.bfloat16 if pure_bf16 else torch.float32
    torch.manual_seed(0)
    with dev:
        model = tf.AutoModelForCausalLM.from_config(
            tf.AutoConfig.from_pretrained(model_dir), dtype=dtype, attn_implementation="sdpa"
        )
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01, fused=True)
    ids = torch.randint(3, model.config.vocab_size, (1, a.max_length), device=dev)
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=not pure_bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step = statistics.median(times[a.warmup :])
    flops = FlopCounter.for_model(model).step_flops(a.max_length, a.max_length**2)
    return {
        "tokens_per_s": a.max_length / step,
        "mfu": flops / step / (a.peak_tflops * 1e12),
        "memory_gb": peak_memory_gb(),
        "note": f"loss {loss.item():.3f}, median of {len(times) - a.warmup} steps",
    }


def trainer_settings(a, kernels: str) -> tuple[str, dict]:
    """tokentrain's best path here: (attention path of gpu_check.PATHS, extra config settings)."""
    from tokentrain.config.schema import FIELDS

    extra: dict = {"kernels": kernels, "dtype": "bfloat16" if cuda() else "float32"}
    field = FIELDS.get("compile")
    if field is not None and field.type in (bool, "bool") and not a.tiny:  # tiny: the plumbing, no compile wait
        extra["compile"] = True
    return ("varlen" if cuda() else "sdpa-mask"), extra


def tokentrain(a, kernels: str, big: bool = False, offload: bool = False) -> dict:
    """The real trainer through its CLI (bench/gpu_check.py's `train`), `a.steps` steps."""
    from tokentrain.model.kernels import liger_families
    from tokentrain.model.tiny import llama_config, make_tokenizer

    model, data = inputs(a)
    if kernels == "liger" and (isinstance(liger_families(), str) or not cuda()):
        kernels = "auto"  # not importable (or no GPU): the trainer says why in its log; noted below
    path, extra = trainer_settings(a, kernels)
    name = "tokentrain"
    # Stopped once step `steps` is logged (gpu_check.train), mid-way through the next one: the
    # final checkpoint and export (100+ GB for the 8B shape) are never begun.
    extra["max_iters"] = a.steps + 2
    if big:
        model = Path(a.workdir) / "model-8b"
        if not (model / "config.json").exists():
            shape = dict(LLAMA3_8B)
            if a.tiny:  # the same engine and settings, a small model
                shape.update(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
                shape.update(num_attention_heads=4, num_key_value_heads=2)
            cfg = llama_config(
                shape.pop("vocab_size"),
                shape.pop("hidden_size"),
                shape.pop("num_hidden_layers"),
                shape.pop("num_attention_heads"),
                kv_heads=shape.pop("num_key_value_heads"),
                intermediate_size=shape.pop("intermediate_size"),
                max_position_embeddings=shape.pop("max_position_embeddings"),
            )
            for k, v in shape.items():
                setattr(cfg, k, v)
            cfg.save_pretrained(model)
            make_tokenizer(cfg.vocab_size).save_pretrained(model)
        extra.update(engine="fsdp2", gradient_checkpointing=True, fsdp_cpu_offload=offload)
        name = "tokentrain-8b-offload" if offload else "tokentrain-8b"
        a = argparse.Namespace(**{**vars(a), "steps": a.steps_8b, "warmup": min(a.warmup, a.steps_8b - 1)})
        extra["max_iters"] = a.steps + 2
    work = Path(a.workdir) / f"run-{name}-{kernels}"
    x = train(path, model, data, work, a, extra)
    log = (work.parent / f"{work.name}.log").read_text(errors="replace").splitlines()
    if not x:
        why = [line for line in log if line.startswith("tokentrain:") or "Error" in line] or log[-1:] or ["no output"]
        raise RuntimeError(why[-1].strip()[:300])
    chose = next((line.split("kernels: ", 1)[1] for line in log if " kernels: " in line), "?")
    return {
        "tokens_per_s": x["tokens_per_s"],
        "mfu": x["mfu"],
        "memory_gb": x["memory_gb"],
        "note": f"{path}, {', '.join(f'{k}={v}' for k, v in extra.items())}; kernels: {chose}; {x['model']}",
    }


def run_part(part: str, a) -> dict:
    if part == "matmul":
        return matmul(a)
    if part.startswith("peer-"):
        return peer(a, pure_bf16=part == "peer-bf16")
    if part == "tokentrain":
        return tokentrain(a, "liger")
    if part == "tokentrain-torch":
        return tokentrain(a, "torch")
    return tokentrain(a, "liger", big=True, offload=part == "8b-offload")


def spawn(part: str, a, limit: float) -> tuple[dict | None, str]:
    """One part in its own process group, killed whole at `limit` seconds: (result, reason)."""
    cmd = [sys.executable, __file__, "--part", part, *sys.argv[1:]]
    log = Path(a.logs) / f"{part}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None, f"timeout ({limit:.0f} s)"
    lines = log.read_text(errors="replace").splitlines()
    res = next((json.loads(x[len(RESULT) :]) for x in lines if x.startswith(RESULT)), None)
    if res is not None:
        return res, ""
    why = next((x for x in reversed(lines) if x.startswith("FAILED ")), None)
    return None, (why[7:] if why else f"exit {proc.returncode}: {(lines or ['no output'])[-1][:300]}")


def fmt(x: float | None, spec: str, unit: str = "") -> str:
    return "n/a" if x is None else format(x, spec) + unit


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small sizes: the plumbing, on CPU too (< 2 min)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {','.join(PARTS)}")
    ap.add_argument("--steps", type=int, help="optimizer steps per 1.1B run (default 20; tiny 3)")
    ap.add_argument("--steps-8b", type=int, help="optimizer steps of the 8B run (default 4; tiny 2)")
    ap.add_argument("--warmup", type=int, help="steps left out of the medians (default 5; tiny 1)")
    ap.add_argument("--max-length", type=int, help="tokens per packed row (default 8192; tiny 128)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak for MFU (H100/H200: 989)")
    ap.add_argument("--budget", type=float, default=290.0, help="seconds for the whole run; parts past it skipped")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--logs", default=None, help="each part's full output goes here (default: the workdir)")
    ap.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process
    a = ap.parse_args()
    a.steps = a.steps or (3 if a.tiny else 20)
    a.steps_8b = a.steps_8b or (2 if a.tiny else 4)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.tiny else 5)
    a.max_length = a.max_length or (128 if a.tiny else 8192)
    if a.part:
        try:
            print(RESULT + json.dumps(run_part(a.part, a)), flush=True)
            return 0
        except Exception as e:
            text = str(e).strip().splitlines()
            print(f"FAILED {type(e).__name__}: {text[0] if text else ''}", flush=True)
            return 1
    t0 = time.perf_counter()
    a.workdir = a.workdir or tempfile.mkdtemp(prefix="tt-gpu-speed-")
    a.logs = a.logs or a.workdir
    for d in (a.workdir, a.logs):
        Path(d).mkdir(parents=True, exist_ok=True)
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(
        f"device: {torch.cuda.get_device_name() if cuda() else 'cpu'}; torch {torch.__version__}; "
        f"liger-kernel {'importable' if importlib.util.find_spec('liger_kernel') else 'not installed'}; "
        f"{a.max_length} tokens per row, batch 1; workdir {a.workdir}"
    )
    sys.argv[1:] = [*sys.argv[1:], "--workdir", a.workdir, "--logs", a.logs]  # the parts share the inputs
    res: dict[str, dict] = {}
    wanted = [p for p in a.parts.split(",") if p]
    for part in wanted:
        left = a.budget - (time.perf_counter() - t0)
        if part not in PARTS:
            print(f"{part}: unknown part (one of {', '.join(PARTS)})")
            continue
        if part == "8b-offload" and "8b-fsdp2" in res:
            print("8b-offload: not needed (8b-fsdp2 fits without offload)")
            continue
        if left < 20:
            print(f"{part}: skipped (the --budget of {a.budget:.0f} s is spent)")
            continue
        t = time.perf_counter()
        x, why = spawn(part, a, min(TIMEOUTS[part] * (0.5 if a.tiny else 1), left))
        took = time.perf_counter() - t
        if x is None:
            print(f"{part}: FAILED ({took:.0f} s): {why}")
            continue
        res[part] = x
        if part == "matmul":
            print(f"{part}: {x['tflops']:.0f} TFLOP/s ({x['note']}; {took:.0f} s)")
            continue
        print(
            f"{part}: {x['tokens_per_s']:.0f} tokens/s, MFU {fmt(x['mfu'] and 100 * x['mfu'], '.1f', '%')}, "
            f"peak memory {fmt(x['memory_gb'], '.1f')} GiB ({took:.0f} s)\n    {x['note']}"
        )
    mm = res.get("matmul", {}).get("tflops")
    base = res.get("peer-amp", {}).get("tokens_per_s")
    print(f"\n| part | tokens/s | MFU vs {a.peak_tflops:g} | MFU vs matmul | peak GiB | vs peer-amp |")
    print("|---|---:|---:|---:|---:|---:|")
    for part in wanted:
        x = res.get(part)
        if part == "matmul" or not x:
            continue
        mfu = x["mfu"]
        print(
            f"| {part} | {x['tokens_per_s']:.0f} | {fmt(mfu and 100 * mfu, '.1f', '%')} "
            f"| {fmt(mfu and mm and 100 * mfu * a.peak_tflops / mm, '.1f', '%')} "
            f"| {fmt(x['memory_gb'], '.1f')} | {fmt(base and x['tokens_per_s'] / base, '.2f')} |"
        )
    if mm:
        print(f"matmul: {mm:.0f} TFLOP/s measured in this run")
    print(f"gpu speed: {len(res)} of {len(wanted)} parts ran, {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
