"""The plan of a run: one dict (the `--json` output; `report.py` prints it as sections).

Every figure a run also computes comes from the code the run uses: the data from
`build_train_data` (indices opened read-only), steps from `StepStream` and `planned_steps`,
the parameter count from the model built on the meta device, FLOPs per token from
`metrics/flops.py`. Memory (`memory.py`) and time are estimates and say so.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tokentrain.errors import ConfigError
from tokentrain.plan import memory
from tokentrain.plan.shape import ModelShape, is_local, model_shape

GiB = memory.GiB
DEFAULT_GPU_MEMORY = 80 * GiB  # an 80 GB H100/A100 when no GPU is visible
ASSUMED_PEAK = ("H100", 989.0)  # dense bf16 TFLOP/s, when neither the config nor a visible GPU says
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LENGTH_SAMPLE = 1 << 20  # documents read for the attention term of FLOPs per token


def parse_size(text: str) -> int:
    """'80GiB', '80G' or '80' (GiB), '80GB' (10^9), '512MiB' ... -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, re.I)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"--gpu-memory {text!r}: expected a size such as 80GiB, 80GB or 80 (GiB)")
    decimal = (m.group(3) or "").lower() == "b"  # GB: powers of 1000; GiB, G: of 1024
    power = "KMGT".index(m.group(2).upper() or "G") + 1
    return int(float(m.group(1)) * (1000 if decimal else 1024) ** power)


def planned_world(args) -> tuple[int, str]:
    """(ranks, where the number came from): --world-size, the launcher's variables, NPROC_PER_NODE
    x NNODES, else 1."""
    if args.world_size is not None:
        if args.world_size < 1:
            raise ConfigError(f"--world-size {args.world_size}: must be >= 1")
        return args.world_size, "--world-size"
    for name in ("WORLD_SIZE", "SLURM_NTASKS") if args.launcher != "none" else ():
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name]), name
    if os.environ.get("NPROC_PER_NODE", "").isdigit():
        nodes = os.environ.get("NNODES", "1")
        n = int(os.environ["NPROC_PER_NODE"]) * (int(nodes) if nodes.isdigit() else 1)
        return n, "NPROC_PER_NODE x NNODES"
    return 1, "one process (give --world-size N to plan more)"


def visible_gpu() -> tuple[str, int] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return props.name, int(props.total_memory)


def compute_dtype(cfg, gpu) -> tuple[str, str]:
    """(compute dtype name, why): as the run resolves it on a GPU (model/lm.py:autocast_dtype)."""
    if cfg.dtype != "auto":
        return cfg.dtype, "dtype in the config"
    if gpu is None:
        return "bfloat16", "dtype = 'auto': bf16 on a GPU that has it (no GPU visible here; on CPU it is fp32)"
    import torch

    from tokentrain.model.lm import autocast_dtype

    found = autocast_dtype("auto", torch.device("cuda"))
    return str(found or torch.float32).replace("torch.", ""), f"dtype = 'auto' on {gpu[0]}"


# ------------------------------------------------------------------ data and steps


def data_plan(cfg, world: int) -> dict:
    """Documents, tokens, samples and epochs (per source of a mixture), steps and tokens per step."""
    import numpy as np

    from tokentrain.data.dataset import build_train_data, planned_counts
    from tokentrain.training.data_stream import StepStream
    from tokentrain.training.schedule import planned_steps

    ds, sampler = build_train_data(cfg, 0, world, write=False)
    stream = StepStream(ds, sampler, cfg.batch_size, cfg.accumulative_counts, 0)
    spe = stream.steps_per_epoch
    steps = planned_steps(cfg.max_iters, cfg.max_epochs, spe)
    global_batch = stream.samples_per_step * world
    if cfg.datasets:  # a mixture: each source's share of the planned steps (as `data stats --config`)
        parts, names = ds.datasets, ds.names
        counts = planned_counts(ds, steps, spe, global_batch)
        shares = [(r["weight"], r["planned_samples"], r["epochs"]) for r in ds.describe(counts)]
    else:
        parts, names = [ds], [Path(cfg.dataset_folder).name or cfg.dataset_folder]
        shares = [(1.0, steps * global_batch, steps / spe)]
    sources, lengths = [], []
    for name, part, (weight, planned, epochs) in zip(names, parts, shares):
        st = part.index.stats
        sources.append(
            {
                "name": name,
                "weight": weight,
                "files": st.files,
                "documents": st.documents,
                "documents_kept": len(part.index),
                "tokens": int(part.index.num_tokens),
                "samples": len(part),
                "planned_samples": int(planned),
                "epochs": float(epochs),
            }
        )
        ends = np.asarray(part.index.ends)
        pick = np.unique(np.linspace(0, len(ends) - 1, min(len(ends), LENGTH_SAMPLE)).astype(np.int64))
        lens = ends[pick] - np.where(pick > 0, ends[np.maximum(pick - 1, 0)], 0)
        lengths.append(np.minimum(lens, cfg.max_length))
    lens = np.concatenate(lengths).astype(np.float64)
    mean_len = float(lens.mean())
    per_sample = cfg.max_length if cfg.pack_to_max_length else mean_len
    return {
        "samples": len(ds),
        "global_batch": global_batch,
        "steps_per_epoch": spe,
        "steps": steps,
        "epochs": steps / spe,
        "tokens_per_step": round(global_batch * per_sample),
        "tokens": round(steps * global_batch * per_sample),
        "packed": cfg.pack_to_max_length,
        "attention_length": float((lens**2).sum() / lens.sum()),  # sum n^2 / sum n: FLOPs of attention
        "sources": sources,
    }


# ------------------------------------------------------------------ sizes


def checkpoint_bytes(m: ModelShape, engine: str, zero: int, compute: str) -> float:
    """One checkpoint: fp32 weights + AdamW m and v (12 bytes per parameter) for every engine;
    DeepSpeed below ZeRO-3 also saves the module's weights in the compute dtype."""
    extra = BYTES[compute] if engine == "deepspeed" and zero < 3 else 0
    return float(m.params * (12 + extra))


def export_bytes(m: ModelShape, export_dtype: str) -> tuple[float, str]:
    """WORK_DIR/hf: every parameter in export_dtype ('auto': the dtype config.json names)."""
    name = m.published_dtype if export_dtype == "auto" else export_dtype
    name = name if name in BYTES else "float32"
    return float(m.params * BYTES[name]), name


def checkpoints_on_disk(steps: int, save_steps: int, limit: int) -> tuple[int, int]:
    """(checkpoints written, most on disk at once): one each save_steps and at the end; a new one
    is complete before the oldest beyond save_total_limit is deleted."""
    written = steps // save_steps + (1 if steps % save_steps else 0)
    return written, written if limit < 0 else min(written, limit + 1)


def nearest_existing(path: Path) -> Path:
    p = path.resolve()
    while not p.exists():
        p = p.parent
    return p


# ------------------------------------------------------------------ the plan


def make_plan(args, cfg, deepspeed: dict | None, work_dir: Path) -> dict:
    from tokentrain.engines.registry import choose
    from tokentrain.model.loss import auto_chunk_tokens
    from tokentrain.utils.disk import free_bytes

    warnings: list[str] = []
    world, world_from = planned_world(args)
    engine = choose(cfg.engine, deepspeed=deepspeed is not None, world_size=world)
    gpu = visible_gpu()
    compute, compute_why = compute_dtype(cfg, gpu)
    data = data_plan(cfg, world)
    over = [s["name"] for s in data["sources"] if len(data["sources"]) > 1 and s["epochs"] > 1]
    if over:
        warnings.append(f"over-sampled (more than one epoch, samples repeat): {', '.join(over)}")
    plan: dict = {
        "config": args.config,
        "resolved_config": cfg.to_dict(),
        "work_dir": str(work_dir),
        "world_size": world,
        "world_size_from": world_from,
        "engine": engine,
        "compute_dtype": compute,
        "compute_dtype_from": compute_why,
        "data": data,
    }
    shape, unknown = model_shape(cfg.pretrained_model_name_or_path, cfg.trust_remote_code)
    plan["model"] = shape.as_dict() if shape else {"unknown": unknown}
    if shape is None:
        warnings.append(f"model size unknown: {unknown}; memory, checkpoint, export and time are not planned")
        plan["warnings"] = warnings
        return plan

    from tokentrain.model.lm import check_positions

    path = cfg.pretrained_model_name_or_path
    if is_local(path) and (too_long := check_positions(path, cfg.trust_remote_code, cfg.max_length)):
        warnings.append(too_long)  # (a hub id's config is read from the cache only, above: no network)

    # memory per GPU, per engine (the one this command would use first)
    setup = memory.deepspeed_setup(deepspeed) if deepspeed else memory.Setup(engine, offload=cfg.fsdp_cpu_offload)
    s = memory.Shape(
        cfg.batch_size,
        cfg.max_length,
        BYTES[compute],
        cfg.gradient_checkpointing,
        cfg.attn_implementation == "eager",
        auto_chunk_tokens(shape.vocab, cfg.loss_chunk_tokens),
    )
    rows = {x.label: memory.engine_memory(shape, s, world, x) for x in memory.setups(setup, world)}
    chosen = setup.label
    gpu_memory, gpu_from = gpu_budget(args, gpu)
    mine = rows[chosen]
    if mine.total > gpu_memory:
        fits = [n for n, r in rows.items() if r.total <= gpu_memory]
        fix = f"fits: {', '.join(fits)}" if fits else "lower batch_size or max_length, or gradient_checkpointing"
        warnings.append(
            f"estimated {mine.total / GiB:.1f} GiB per GPU with {chosen} exceeds {gpu_memory / GiB:.0f} GiB "
            f"({gpu_from}); {fix}"
        )
    plan["memory"] = {
        "gpu_memory": gpu_memory,
        "gpu_memory_from": gpu_from,
        "chosen": chosen,
        "estimate": "model states + activations; see docs/trainer.md (Plan a run) for the formulas",
        "engines": [r.as_dict() for r in rows.values()],
    }

    # checkpoints, export, disk
    ckpt = checkpoint_bytes(shape, engine, setup.zero, compute)
    export, export_dtype = export_bytes(shape, cfg.export_dtype)
    written, at_once = checkpoints_on_disk(data["steps"], cfg.save_steps, cfg.save_total_limit)
    need = ckpt * at_once + export
    where = nearest_existing(work_dir)
    free = free_bytes(where)
    plan["disk"] = {
        "checkpoint": ckpt,
        "checkpoints_written": written,
        "checkpoints_at_once": at_once,
        "export": export,
        "export_dtype": export_dtype,
        "needed": need,
        "free": free,
        "free_at": str(where),
    }
    if free is not None and free < need:
        warnings.append(
            f"{where}: {free / 1e9:.1f} GB free, the run needs about {need / 1e9:.1f} GB ({at_once} checkpoint(s) of "
            f"{ckpt / 1e9:.1f} GB + the {export / 1e9:.1f} GB export); lower save_total_limit or free space"
        )

    plan["time"] = time_plan(args, cfg, shape, data, world, compute, gpu)
    plan["warnings"] = warnings
    return plan


def gpu_budget(args, gpu) -> tuple[int, str]:
    if args.gpu_memory:
        return parse_size(args.gpu_memory), "--gpu-memory"
    if gpu is not None:
        return gpu[1], f"the visible {gpu[0]}"
    return DEFAULT_GPU_MEMORY, "no GPU visible: assumed 80 GiB (give --gpu-memory)"


def time_plan(args, cfg, shape: ModelShape, data: dict, world: int, compute: str, gpu) -> dict:
    """Hours at a stated rate: --tokens-per-s, else world x peak x MFU / FLOPs per token (the
    MFU counts model FLOPs, as the run's logged MFU does: recompute is inside it)."""
    from tokentrain.metrics.flops import PEAK_TFLOPS

    flops_per_token = 6.0 * shape.matmul_params + 6.0 * shape.layers * shape.attn_dim * data["attention_length"]
    if args.tokens_per_s:
        rate, how = float(args.tokens_per_s), "--tokens-per-s"
    else:
        if cfg.peak_tflops:
            peak, source = cfg.peak_tflops, "peak_tflops in the config"
        else:
            name = gpu[0] if gpu else ASSUMED_PEAK[0]
            key = next((k for k in PEAK_TFLOPS if k in name), None)
            peak = PEAK_TFLOPS[key] if key else ASSUMED_PEAK[1]
            halved = ", halved for fp32" if compute == "float32" else ""
            source = f"{key or ASSUMED_PEAK[0]} bf16 peak{halved}" + ("" if gpu else "; no GPU visible: assumed")
            peak = peak / 2 if halved else peak
        rate = world * peak * 1e12 * args.mfu / flops_per_token
        how = (
            f"{world} GPU(s) x {peak:.0f} TFLOP/s ({source}) x MFU {args.mfu:g} / {flops_per_token:.3g} FLOPs per token"
        )
    seconds = data["tokens"] / rate
    return {
        "flops_per_token": flops_per_token,
        "tokens_per_s": rate,
        "tokens_per_s_from": how,
        "seconds": seconds,
        "hours": seconds / 3600,
        "steps_per_s": rate / max(1, data["tokens_per_step"]),
    }
