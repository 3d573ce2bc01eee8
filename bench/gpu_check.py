"""GPU check of the attention paths (run by bench/gpu_check.sh; see there).

(a) correctness on CUDA, bf16 autocast: for each path -- ``varlen`` (PyTorch's varlen
    kernel, `tokentrain.model.varlen`), ``flex`` (compiled flex_attention with a document
    BlockMask, `tokentrain.model.flex`) and ``sdpa-mask`` (sdpa + our 4D block mask) -- on
    llama (GQA), mistral and qwen2 (sliding window 64, shorter than the documents) and
    gemma2 (soft-capping; sdpa refuses it, so eager there): the isolation probe (gradient
    across documents exactly 0), the causality probe (no gradient from later tokens) and the
    packed-vs-alone logits probe; one verdict line per path x family, never a crash.
(a2) the compiled flex kernel alone vs sdpa with the dense mask, fp32 and bf16, rows of 300 and
    8192 tokens, with and without a window (a block-table bug vs a dtype bug).
(d) the shipped tiny demo with its default attention settings ('auto'), 6 steps under local,
    FSDP2 (one process and torchrun 1), DDP (torchrun 1) and DeepSpeed ZeRO-2/3 when importable:
    exit code, losses, the attention chosen and any fallback.
(b) speed: a ~1.1B Llama (TinyLlama shape, random init from a config) trained by
    ``tokentrain train`` at max_length 8192, packed, for --steps steps on synthetic data,
    with each path of --paths (default varlen,sdpa-mask); tokens/s and MFU (peak
    --peak-tflops, default 989 = H200 bf16 dense) from metrics.jsonl, median over the steps
    after --warmup, and each CUDA path / sdpa-mask.
(c) peak GPU memory of each run (the trainer's ``memory_gb``: max_memory_allocated).

--tiny: small sizes for a plumbing check (runs on CPU too: parts needing CUDA are skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PATHS = {  # attn_implementation, doc_masking
    "varlen": ("varlen", "varlen"),
    "flex": ("flex", "flex"),
    "sdpa-mask": ("sdpa", "mask4d"),
}
CUDA_ONLY = ("varlen", "flex")


def probes(device: torch.device, tiny: bool) -> bool:
    """Each path x family: one verdict line (ok, or FAILED and the one-line reason); never raises."""
    import transformers as tf

    from tokentrain.model.attention import (
        DocMasking,
        attention_windows,
        logits_tolerance,
        probe_causality,
        probe_isolation,
        probe_logits,
    )
    from tokentrain.model.flex import FLEX_IMPL
    from tokentrain.model.varlen import VARLEN_IMPL, varlen_available

    dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2) if tiny else {}
    common = dict(
        vocab_size=1024,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    common.update(dims)
    w = 8 if tiny else 64
    models = {
        "llama": tf.LlamaConfig(**common),
        "mistral": tf.MistralConfig(**common, sliding_window=w),
        "qwen2": tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=w, max_window_layers=1),
        "gemma2": tf.Gemma2Config(**common, head_dim=64, sliding_window=w, attn_logit_softcapping=50.0),
    }
    dtype = torch.bfloat16 if device.type == "cuda" else None
    tol = logits_tolerance(dtype)
    ok = True
    print(f"(a) probes on {device.type}, compute {dtype or 'float32'}; logits bound {tol:g} (relative)")
    for path, (impl, mode) in PATHS.items():
        if impl == "varlen":
            if not varlen_available(device):
                print(f"  {path}: skipped (needs torch.nn.attention.varlen on a CUDA GPU of capability >= 8)")
                continue
            impl = VARLEN_IMPL
        if impl == "flex":
            if device.type != "cuda":
                print(f"  {path}: skipped (CUDA only: flex_attention has no backward on CPU)")
                continue
            impl = FLEX_IMPL
        for name, cfg in models.items():
            use = "eager" if (name == "gemma2" and impl == "sdpa") else impl
            t0 = time.perf_counter()
            try:
                torch.manual_seed(0)
                m = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=use).to(device)
                masking = DocMasking(mode, use, attention_windows(m.config))
                leak = probe_isolation(m, masking, device, dtype)
                ahead = probe_causality(m, masking, device, dtype)
                diff = probe_logits(m, masking, device, dtype)
                good = leak == 0.0 and ahead == 0.0 and diff <= tol
                verdict = (
                    f"cross-document gradient {leak:.3g}, gradient from later tokens {ahead:.3g}, "
                    f"packed vs alone {diff:.3g}"
                )
                del m
            except Exception as e:
                good, verdict = False, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            ok &= good
            took = time.perf_counter() - t0
            print(f"  {path:9s} {name:8s} ({use}): {verdict} ({took:.1f}s) {'ok' if good else 'FAILED'}")
    return ok


def flex_kernel(device: torch.device) -> bool:
    """The compiled flex kernel alone against sdpa with the dense mask: fp32 and bf16, a short
    row (not a multiple of 128) and a long one -- tells a block-table bug from a dtype one."""
    from tokentrain.model.flex import _FLEX
    from tokentrain.model.masks import block_causal_mask, document_block_masks

    if _FLEX is None or device.type != "cuda":
        print("(a2) flex kernel: skipped (CUDA only)")
        return True
    print("(a2) flex kernel alone vs sdpa + dense mask (GQA 8/2 heads, D 64)")
    compiled = torch.compile(_FLEX[0], dynamic=False)
    ok = True
    for n, lens in ((300, [37, 130, 90, 43]), (8192, [3000, 1, 2500, 2691])):
        pos = torch.cat([torch.arange(k) for k in lens])[None].to(device)
        for dt in (torch.float32, torch.bfloat16):
            for window in (None, 64):
                try:
                    g = torch.Generator(device=device).manual_seed(0)
                    q = torch.randn(1, 8, n, 64, device=device, dtype=dt, generator=g)
                    k, v = (torch.randn(1, 2, n, 64, device=device, dtype=dt, generator=g) for _ in range(2))
                    out = compiled(q, k, v, block_mask=document_block_masks(pos, window)[window], enable_gqa=True)
                    mask = block_causal_mask(pos, None, window)
                    ref = torch.nn.functional.scaled_dot_product_attention(
                        q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True
                    )
                    diff = float((out.float() - ref).abs().max())
                    good = diff <= (1e-4 if dt == torch.float32 else 2e-2)
                    line = f"max |diff| {diff:.3g}"
                except Exception as e:
                    good, line = False, f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
                ok &= good
                print(f"  L={n:5d} {str(dt)[6:]:8s} window {window}: {line} {'ok' if good else 'FAILED'}")
    return ok


def engines(work: Path, cuda: bool, tiny: bool) -> bool:
    """The shipped tiny demo with its default attention settings, a few steps under each engine
    and launcher a GPU user starts with; one verdict line each (exit code, last loss)."""
    import importlib.util

    data, demo = work / "demo-data", ROOT / "demo" / "tiny-llama"
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env["TOKENTRAIN_CACHE"] = str(work / "cache")
    tt = [sys.executable, "-m", "tokentrain"]
    r = subprocess.run(
        [*tt, "tokenize", str(ROOT / "demo/data/chat.jsonl"), "--tokenizer", str(demo), "--out", str(data)],
        env=env,
        capture_output=True,
        text=True,
    )
    if r.returncode:
        print(f"(d) engines: tokenize failed: {r.stderr.strip().splitlines()[-1:]}")
        return False
    conf = work / "tiny_demo.py"
    text = (ROOT / "src/tokentrain/configs/templates/tiny_demo.py").read_text()
    conf.write_text(
        text.replace("'demo/tiny-llama'", repr(str(demo))).replace("'demo_out/data'", repr(str(data)))
        + "\nmax_iters = 6\nsave_steps = 1000\nevaluation_freq = 1000\nlog_interval = 1\n"
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}"]
    runs = {
        "local": [*tt, "train", str(conf)],
        "fsdp2": [*tt, "train", str(conf), "--engine", "fsdp2"],
        "fsdp2, torchrun 1": [
            *torchrun,
            "-m",
            "tokentrain.train",
            str(conf),
            "--launcher",
            "pytorch",
            "--engine",
            "fsdp2",
        ],
        "ddp, torchrun 1": [*torchrun, "-m", "tokentrain.train", str(conf), "--launcher", "pytorch", "--engine", "ddp"],
    }
    if tiny:  # the CPU plumbing run (a test): one plain and one torchrun launch keep this code alive
        runs = {k: runs[k] for k in ("local", "ddp, torchrun 1")}
    elif importlib.util.find_spec("deepspeed") is not None:
        runs["deepspeed zero2"] = [*tt, "train", str(conf), "--deepspeed", "deepspeed_zero2"]
        runs["deepspeed zero3"] = [*tt, "train", str(conf), "--deepspeed", "deepspeed_zero3"]
    else:
        print("(d) deepspeed is not importable: ZeRO runs skipped")
    print(f"(d) the tiny demo, default attention settings, 6 steps, on {'cuda' if cuda else 'cpu'}")
    ok = True
    starts: dict[str, tuple[str, list[float]]] = {}  # engine -> (init digest, losses): issue 21's same start
    for i, (name, cmd) in enumerate(runs.items()):
        w = work / f"engine-{i}"
        t0 = time.perf_counter()
        try:
            r = subprocess.run([*cmd, "--work-dir", str(w)], env=env, capture_output=True, text=True, timeout=150)
            code, log = r.returncode, r.stdout + r.stderr
        except subprocess.TimeoutExpired:
            code, log = "timeout (150 s)", ""
        rows = (
            [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
            if (w / "metrics.jsonl").exists()
            else []
        )
        loss = [x["loss"] for x in rows if "loss" in x]
        model = next((x.split("model: ", 1)[1] for x in log.splitlines() if "model: " in x), "")
        fell_back = next((x.split("attention: ", 1)[1] for x in log.splitlines() if "] attention: " in x), "")
        digest = next(
            (x.rsplit("digest ", 1)[1].strip() for x in log.splitlines() if " init: " in x and "digest " in x), "?"
        )
        starts[name] = (digest, loss)
        good = code == 0 and len(loss) == 6
        why = "" if good else " | " + " | ".join(x for x in log.splitlines() if x.startswith("tokentrain:"))[-300:]
        ok &= good
        print(
            f"  {name:18s}: exit {code}, losses {' '.join(f'{x:.4f}' for x in loss)} "
            f"({time.perf_counter() - t0:.0f}s) {'ok' if good else 'FAILED'}{why}"
        )
        print(f"  {'':18s}  {model}" + (f"; fallback: {fell_back}" if fell_back else ""))
        shutil.rmtree(w, ignore_errors=True)
    ok &= same_start(starts)
    return ok


def free_port() -> int:
    """A free loopback port for torchrun (a fixed one collides with any other run on the machine)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def same_start(starts: dict[str, tuple[str, list[float]]]) -> bool:
    """From scratch (the demo folder is config-only), every engine starts from the same weights
    (initialised by name: one digest) and so logs the same first loss; later steps may drift by
    the compute dtype's rounding (bf16 on CUDA), printed, not judged."""
    digests = {d for d, _ in starts.values()}
    firsts = [loss[0] for _, loss in starts.values() if loss]
    lasts = [loss[-1] for _, loss in starts.values() if loss]
    if not firsts:
        return False
    spread = (max(firsts) - min(firsts)) / abs(min(firsts))
    good = len(digests) == 1 and "?" not in digests and spread <= 1e-3
    print(
        f"  same start: init digest(s) {' '.join(sorted(digests))}; step-1 loss spread {spread:.1e} (<= 1e-3), "
        f"step-{len(starts[next(iter(starts))][1])} spread {(max(lasts) - min(lasts)) / abs(min(lasts)):.1e} "
        f"{'ok' if good else 'FAILED'}"
    )
    return good


def model_folder(out: Path, tiny: bool, vocab: int) -> Path:
    from tokentrain.model.tiny import llama_config, make_tokenizer

    if tiny:
        cfg = llama_config(vocab, 64, 2, 4, kv_heads=2)
    else:  # TinyLlama 1.1B shape
        cfg = llama_config(vocab, 2048, 22, 32, kv_heads=4, intermediate_size=5632, max_position_embeddings=8192)
    cfg.save_pretrained(out)  # config only: the trainer starts from random weights
    make_tokenizer(vocab).save_pretrained(out)
    return out


def train(path: str, model: Path, data: Path, work: Path, a) -> dict:
    impl, mode = PATHS[path]
    conf = work.parent / f"{path}.py"
    settings = dict(
        pretrained_model_name_or_path=str(model),
        dataset_folder=str(data),
        max_length=a.max_length,
        pack_to_max_length=True,
        batch_size=1,
        max_iters=a.steps,
        lr=1e-4,
        warm_up_ratio=0.0,
        save_steps=10**6,
        evaluation_freq=10**6,
        evaluation_inputs=[],
        export_dtype="bfloat16",
        log_interval=1,
        tensorboard=False,
        dataloader_num_workers=2,
        attn_implementation=impl,
        doc_masking=mode,
        peak_tflops=a.peak_tflops,
    )
    conf.write_text("".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env["TOKENTRAIN_CACHE"] = str(work.parent / "cache")
    t0 = time.perf_counter()
    log_path = work.parent / f"{path}.log"
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tokentrain", "train", str(conf), "--work-dir", str(work)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
        rows: list[dict] = []
        metrics = work / "metrics.jsonl"
        while proc.poll() is None:  # the last step logged: stop it before it writes a 13 GB checkpoint
            time.sleep(1)
            if metrics.exists():
                rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip().endswith("}")]
                if any(x.get("step") == a.steps and "tokens_per_s" in x for x in rows):
                    proc.kill()
                    proc.wait()
                    break
    wall = time.perf_counter() - t0
    text = log_path.read_text()
    if proc.returncode not in (0, -9):
        print(f"  {path}: tokentrain train failed (exit {proc.returncode}):\n{text[-3000:]}")
        return {}
    if metrics.exists():
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip().endswith("}")]
    steps = [x for x in rows if "tokens_per_s" in x and x.get("step", 0) > a.warmup]
    model_line = next((x for x in text.splitlines() if "model: " in x), "")
    shutil.rmtree(work, ignore_errors=True)
    if not steps:
        print(f"  {path}: no timed steps after warm-up {a.warmup}")
        return {}
    mfu = [x["mfu"] for x in steps if x.get("mfu") is not None]
    return {
        "tokens_per_s": statistics.median(x["tokens_per_s"] for x in steps),
        "mfu": statistics.median(mfu) if mfu else None,
        "memory_gb": max(x.get("memory_gb", 0.0) for x in rows),
        "steps": len(steps),
        "wall_s": wall,
        "model": model_line.split("model: ", 1)[-1],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small sizes: a plumbing check (CPU too)")
    ap.add_argument("--steps", type=int, help="optimizer steps per run (default 30; tiny 4)")
    ap.add_argument("--warmup", type=int, help="steps left out of the medians (default 5; tiny 1)")
    ap.add_argument("--max-length", type=int, help="default 8192; tiny 128")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak for MFU (H200: 989)")
    ap.add_argument("--skip", default="", help="comma list: probes,engines,train")
    ap.add_argument("--paths", default="varlen,sdpa-mask", help=f"paths trained in (b), of {','.join(PATHS)}")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    a.steps = a.steps or (4 if a.tiny else 30)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.tiny else 5)
    a.max_length = a.max_length or (128 if a.tiny else 8192)
    skip = set(filter(None, a.skip.split(",")))
    from tokentrain.model.varlen import KERNEL

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(
        f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; torch {torch.__version__}; "
        f"varlen_attn {f'present, causal by {KERNEL.causal_by}, enable_gqa {KERNEL.takes_gqa}' if KERNEL else 'absent'}"
    )
    ok = True
    t0 = time.perf_counter()
    if "probes" not in skip:
        ok &= probes(device, a.tiny)
        ok &= flex_kernel(device)
        print(f"  probes took {time.perf_counter() - t0:.0f}s")
    if "engines" not in skip:
        scratch = Path(tempfile.mkdtemp(prefix="tt-gpu-engines-"))
        ok &= engines(scratch, cuda, a.tiny)
        shutil.rmtree(scratch, ignore_errors=True)
    if "train" not in skip:
        from tokentrain.data.synth import synth_dataset

        work = Path(a.workdir or tempfile.mkdtemp(prefix="tt-gpu-check-"))
        work.mkdir(parents=True, exist_ok=True)
        vocab = 512 if a.tiny else 32000
        model = model_folder(work / "model", a.tiny, vocab)
        tokens = (a.steps + 2) * a.max_length
        mean = 60 if a.tiny else 1500
        synth_dataset(work / "data", 1, max(2, int(tokens / mean * 1.3)), seed=0, mean_length=mean, vocab_size=vocab)
        print(f"(b) training a Llama from config, max_length {a.max_length} packed, {a.steps} steps per path")
        res = {}
        for path in filter(None, a.paths.split(",")):
            if path not in PATHS:
                print(f"  {path}: unknown path (one of {', '.join(PATHS)})")
                ok = False
                continue
            if path in CUDA_ONLY and not cuda:
                print(f"  {path}: skipped (CUDA only)")
                continue
            res[path] = train(path, model, work / "data", work / f"run-{path}", a)
            x = res[path]
            if x:
                mfu = f"{100 * x['mfu']:.1f}%" if x["mfu"] is not None else "n/a"
                print(
                    f"  {path:9s}: {x['tokens_per_s']:.0f} tokens/s, MFU {mfu} (peak {a.peak_tflops:g} TFLOP/s), "
                    f"(c) peak memory {x['memory_gb']:.1f} GiB; median of {x['steps']} steps, run {x['wall_s']:.0f}s"
                )
                print(f"             {x['model']}")
            ok &= bool(x)
        s = res.get("sdpa-mask")
        for path in CUDA_ONLY:
            v = res.get(path)
            if v and s:
                print(
                    f"  {path} / sdpa-mask: tokens/s x{v['tokens_per_s'] / s['tokens_per_s']:.2f}, "
                    f"peak memory x{v['memory_gb'] / s['memory_gb']:.2f}"
                )
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"gpu check {'passed' if ok else 'FAILED'} in {time.perf_counter() - t0:.0f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
