"""`mixed_precision = 'autocast'` against `'params'` (bf16 compute parameters, fp32 masters) on the
local engine: training tokens/s and peak memory of one Llama, the same steps (forward, backward
of `--accum` micro-batches, clip, AdamW) through the engine the trainer uses. Rounds alternate
the modes (A B B A ...: machine noise hits both alike); each round builds the engine afresh
from the same initial weights, so the peak memory is that mode's alone. What decides whether
`auto` should pick `params` on local/ddp on a GPU (docs/trainer.md, "Mixed precision").

    python bench/mixed_precision.py [--hidden 1024 --layers 8 --vocab 32000 --max-length 2048 --accum 4]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch


def run_mode(mode: str, state: dict, cfg, a, device: torch.device) -> tuple[list[float], float]:
    """Step times (s) and peak memory (GB; CUDA only) of `a.steps` steps after one warm-up step."""
    from transformers import AutoModelForCausalLM

    from tokentrain.distributed.env import DistEnv
    from tokentrain.engines.local import LocalEngine
    from tokentrain.model.attention import DocMasking
    from tokentrain.model.lm import CausalLMWithLoss

    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    hf.load_state_dict(state)
    hf.config.use_cache = False
    module = CausalLMWithLoss(hf.to(device).train(), DocMasking("positions", "sdpa"), torch.bfloat16)
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, **fused)
    engine = LocalEngine(DistEnv(0, 1, 0, 1, device, "gloo"), torch.bfloat16, mode)
    engine.prepare(module, opt)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (1, a.max_length), generator=g).to(device)
    labels, pos = ids.roll(-1, 1), torch.arange(a.max_length, device=device)[None]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(a.steps + 1):
        sync(device)
        t0 = time.perf_counter()
        for k in range(a.accum):
            with engine.accumulate(is_last=k == a.accum - 1):
                engine.backward(engine.forward(ids, labels, pos) / (a.accum * a.max_length))
        engine.step(1.0)
        sync(device)
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
    return times, peak


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--accum", type=int, default=4, help="micro-batches per step")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from tokentrain.model.tiny import llama_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = llama_config(a.vocab, a.hidden, a.layers, max(1, a.hidden // 64))
    state = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).state_dict()
    modes = ["autocast", "params"]
    times: dict[str, list[float]] = {m: [] for m in modes}
    peaks: dict[str, float] = {}
    for r in range(a.rounds):
        for m in modes if r % 2 == 0 else modes[::-1]:
            t, peaks[m] = run_mode(m, state, cfg, a, device)
            times[m] += t
    n = sum(v.numel() for v in state.values())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"command: {' '.join(shlex.quote(x) for x in [sys.executable, *sys.argv])}")
    print(f"machine: {name}, torch {torch.__version__}")
    print(
        f"model: Llama {n / 1e6:.1f}M parameters, max_length {a.max_length}, {a.accum} micro-batches per step; "
        f"{a.rounds} rounds x {a.steps} steps"
    )
    tokens = a.max_length * a.accum
    for m in modes:
        best, med = tokens / min(times[m]), tokens / statistics.median(times[m])
        print(f"{m}: {best:.0f} tokens/s (fastest step), {med:.0f} (median step), peak memory {peaks[m]:.2f} GB")
    ratio = statistics.median(times["autocast"]) / statistics.median(times["params"])
    print(f"params / autocast: x{ratio:.2f} tokens/s (median step)")


if __name__ == "__main__":
    main()
