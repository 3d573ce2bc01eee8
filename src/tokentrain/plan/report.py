"""The plan as a person reads it: one section per topic (the dict of `make.py`, as text)."""

from __future__ import annotations

from tokentrain.plan.make import GiB


def _n(x: float) -> str:
    """A count, short: 6.74B, 126M, 16.4k, 300."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}" if isinstance(x, float) and not x.is_integer() else str(int(x))


def _gb(x: float) -> str:
    return f"{x / 1e9:.1f} GB" if x >= 1e8 else f"{x / 1e6:.1f} MB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" + (f" ({seconds / 86400:.1f} days)" if seconds >= 2 * 86400 else "")


def render(plan: dict) -> str:
    out = [f"plan of {plan['config']}: no weights loaded, nothing written"]
    out.append("\nconfig (resolved)")
    out += [f"  {k} = {v!r}" for k, v in plan["resolved_config"].items()]
    out.append(f"  work dir: {plan['work_dir']}")
    out.append(f"  ranks: {plan['world_size']} ({plan['world_size_from']}); engine: {plan['engine']}")
    out.append(f"  compute dtype: {plan['compute_dtype']} ({plan['compute_dtype_from']})")
    out += _data(plan["data"])
    out += _model(plan["model"])
    if "memory" in plan:
        out += _memory(plan)
        out += _disk(plan["disk"])
        out += _time(plan["time"], plan["data"])
    out.append("\nwarnings" if plan["warnings"] else "\nwarnings: none")
    out += [f"  ! {w}" for w in plan["warnings"]]
    return "\n".join(out)


def _data(d: dict) -> list[str]:
    out = ["\ndata"]
    head = f"  {'source':<16} {'weight':>7} {'files':>6} {'documents':>10} {'kept':>10} {'tokens':>9} {'samples':>9}"
    out.append(head + f" {'planned':>9} {'epochs':>7}")
    for s in d["sources"]:
        out.append(
            f"  {s['name'][:16]:<16} {s['weight']:>7.4f} {s['files']:>6} {_n(s['documents']):>10} "
            f"{_n(s['documents_kept']):>10} {_n(s['tokens']):>9} {_n(s['samples']):>9} {_n(s['planned_samples']):>9} "
            f"{s['epochs']:>7.3f}"
        )
    kind = "packs" if d["packed"] else "documents (unpacked)"
    out.append(
        f"  {d['samples']} samples ({kind}); global batch {d['global_batch']}; {d['steps_per_epoch']} steps per epoch"
    )
    out.append(f"  steps: {d['steps']} ({d['epochs']:.3g} epoch(s))")
    about = "" if d["packed"] else "about "
    out.append(f"  tokens per step: {about}{d['tokens_per_step']}; tokens in all: {about}{_n(d['tokens'])}")
    return out


def _model(m: dict) -> list[str]:
    if "unknown" in m:
        return ["\nmodel", f"  unknown: {m['unknown']}"]
    return [
        "\nmodel (built on the meta device from config.json)",
        f"  {m['model_type']}: {m['params']} parameters ({_n(m['params'])}), {m['layers']} layers, hidden "
        f"{m['hidden']}, MLP {m['intermediate']}, {m['heads']} heads, vocab {m['vocab']}",
        f"  loss head: {'fused chunked' if m['fused_loss'] else 'chunked from logits'}",
    ]


def _memory(plan: dict) -> list[str]:
    mem = plan["memory"]
    cfg = plan["resolved_config"]
    tokens = cfg["batch_size"] * cfg["max_length"]
    ckpt = {True: ", gradient checkpointing", "selective": ", selective gradient checkpointing"}.get(
        cfg["gradient_checkpointing"], ""
    )
    out = [
        f"\nmemory per GPU, GiB (estimate: {mem['estimate']})",
        f"  {plan['world_size']} rank(s), {plan['compute_dtype']}, {tokens} tokens per micro-batch{ckpt}; "
        f"GPU {mem['gpu_memory'] / GiB:.0f} GiB ({mem['gpu_memory_from']})",
        f"    {'engine':<26} {'params':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'total':>8} {'host':>8}",
    ]
    for r in mem["engines"]:
        mark = "*" if r["engine"] == mem["chosen"] else " "
        over = "  > GPU" if r["total"] > mem["gpu_memory"] else ""
        cells = " ".join(
            f"{r[k] / GiB:>8.2f}" for k in ("params", "grads", "optimizer", "activations", "total", "host")
        )
        out.append(f"  {mark} {r['engine']:<26} {cells}{over}")
    out.append("  (* this run's engine; host: CPU memory per rank)")
    return out


def _disk(k: dict) -> list[str]:
    free = f"{_gb(k['free'])} free at {k['free_at']}" if k["free"] is not None else "free space unknown"
    return [
        "\ncheckpoints and export",
        f"  a checkpoint: {_gb(k['checkpoint'])} (fp32 weights + AdamW state); {k['checkpoints_written']} written, "
        f"at most {k['checkpoints_at_once']} on disk at once",
        f"  export hf/: {_gb(k['export'])} ({k['export_dtype']})",
        f"  disk: needs {_gb(k['needed'])}; {free}",
    ]


def _time(t: dict, d: dict) -> list[str]:
    return [
        "\ntime (estimate)",
        f"  {_n(t['tokens_per_s'])} tokens/s: {t['tokens_per_s_from']}",
        f"  {_n(d['tokens'])} tokens in {d['steps']} steps: {_duration(t['seconds'])} ({t['steps_per_s']:.3g} steps/s)",
    ]
