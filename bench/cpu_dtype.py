"""Why `dtype='auto'` is fp32 on CPU: training tokens/s of one small Llama in fp32 and under
bf16 autocast, on this CPU, in interleaved rounds (A B B A ...: machine noise hits both alike).
Reported per dtype: tokens/s of the fastest step and the median step, and bf16 / fp32.

    .venv/bin/python bench/cpu_dtype.py [--hidden 256 --layers 4 --max-length 1024 --steps 3 --rounds 4]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def step_times(model, opt, ids, pos, dtype, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from tokentrain.model.tiny import llama_config

    torch.manual_seed(0)
    cfg = llama_config(a.vocab, a.hidden, a.layers, max(1, a.hidden // 64))
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, a.vocab, (1, a.max_length))
    pos = torch.arange(a.max_length)[None]
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    times: dict[str, list[float]] = {k: [] for k in dtypes}
    for dt in dtypes.values():  # warm-up
        step_times(model, opt, ids, pos, dt, 1)
    for r in range(a.rounds):
        for k in list(dtypes) if r % 2 == 0 else list(dtypes)[::-1]:
            times[k] += step_times(model, opt, ids, pos, dtypes[k], a.steps)
    n = sum(p.numel() for p in model.parameters())
    print(f"command: {' '.join(shlex.quote(x) for x in [sys.executable, *sys.argv])}")
    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"AVX512-BF16 {torch.cpu._is_avx512_bf16_supported()}, AMX {torch.cpu._is_amx_tile_supported()}"
    )
    print(f"model: Llama {n / 1e6:.1f}M parameters, max_length {a.max_length}; {a.rounds} rounds x {a.steps} steps")
    best = {k: a.max_length / min(v) for k, v in times.items()}
    med = {k: a.max_length / statistics.median(v) for k, v in times.items()}
    for k in dtypes:
        print(f"{k}: {best[k]:.0f} tokens/s (fastest step), {med[k]:.0f} (median step)")
    print(f"bf16 / fp32: x{best['bf16'] / best['fp32']:.2f} (fastest), x{med['bf16'] / med['fp32']:.2f} (median)")


if __name__ == "__main__":
    main()
