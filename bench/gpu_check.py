"""GPU check of the attention paths (run by bench/gpu_check.sh; see there).

(a) correctness on CUDA, bf16 autocast: for each path -- ``varlen`` (PyTorch's varlen
    kernel, `tokentrain.model.varlen`), ``flex`` (compiled flex_attention with a document
    BlockMask, `tokentrain.model.flex`) and ``sdpa-mask`` (sdpa + our 4D block mask) -- on
    llama (GQA), mistral and qwen2 (sliding window 64, shorter than the documents) and
    gemma2 (soft-capping; sdpa refuses it, so eager there): the isolation probe (gradient
    across documents exactly 0) and the packed-vs-alone logits probe.
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
    import transformers as tf

    from tokentrain.model.attention import (
        DocMasking,
        attention_windows,
        logits_tolerance,
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
            torch.manual_seed(0)
            m = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=use).to(device)
            masking = DocMasking(mode, use, attention_windows(m.config))
            t0 = time.perf_counter()
            leak = probe_isolation(m, masking, device, dtype)
            diff = probe_logits(m, masking, device, dtype)
            good = leak == 0.0 and diff <= tol
            ok &= good
            print(
                f"  {path:9s} {name:8s} ({use}): cross-document gradient {leak:.3g}, packed vs alone {diff:.3g} "
                f"({time.perf_counter() - t0:.1f}s) {'ok' if good else 'FAILED'}"
            )
            del m
    return ok


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
    ap.add_argument("--skip", default="", help="comma list: probes,train")
    ap.add_argument("--paths", default="varlen,sdpa-mask", help=f"paths trained in (b), of {','.join(PATHS)}")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    a.steps = a.steps or (4 if a.tiny else 30)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.tiny else 5)
    a.max_length = a.max_length or (128 if a.tiny else 8192)
    skip = set(filter(None, a.skip.split(",")))
    from tokentrain.model.varlen import varlen_attn

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(
        f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; torch {torch.__version__}; "
        f"varlen_attn {'present' if varlen_attn is not None else 'absent'}"
    )
    ok = True
    t0 = time.perf_counter()
    if "probes" not in skip:
        ok &= probes(device, a.tiny)
        print(f"  probes took {time.perf_counter() - t0:.0f}s")
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
