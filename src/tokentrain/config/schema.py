"""Every setting a training config may hold: one typed dataclass, its defaults and its limits.

The config file is plain Python (module-level names, as in the InternLM/xtuner templates);
`loader.load_config` turns it into a `TrainConfig`. The field list below *is* the schema:
an unknown name in a config file is an error, so a typo never silently falls back to a
default. Defaults follow the seed template (`internlm_7b_full_intern_repo_dataset_template`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tokentrain.engines.specs import CHOICES as ENGINES  # the one table of engines
from tokentrain.utils.dtypes import DTYPE_NAMES

DTYPES = ("auto", *DTYPE_NAMES)
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "varlen", "flex", "flash_attention_2", "flash_attention_3")
DOC_MASKING = ("auto", "positions", "mask4d", "varlen", "flex")
KERNELS = ("auto", "liger", "torch")
NAN_POLICIES = ("stop", "skip")
MIXED_PRECISION = ("auto", "autocast", "params")  # engines/mixed_precision.py
COMPILE_CHOICES = ("auto", True, False)
CHECKPOINTING_CHOICES = (False, True, "selective")
MAX_LENGTH_LIMIT = 1 << 24


@dataclass
class TrainConfig:
    # ---------------------------------------------------------------- model
    pretrained_model_name_or_path: str = ""
    trust_remote_code: bool = False
    # ---------------------------------------------------------------- data
    dataset_folder: str = ""  # None in a config file means not set (the loader makes it "")
    # A mixture instead: [dict(folder=..., weight=..., name=...), ...] (data/mixture.py); no dataset_folder then.
    datasets: list[dict] = field(default_factory=list)
    val_dataset_folder: str | None = None
    max_length: int = 2048
    pack_to_max_length: bool = True
    shuffle_before_pack: bool = True
    min_length: int = 1
    file_type: str = ".bin"
    data_order_path: str | None = None
    zero_is_target: bool = False
    # ---------------------------------------------------------------- schedule
    batch_size: int = 1  # per device, per micro-batch
    accumulative_counts: int = 1
    dataloader_num_workers: int = 0
    max_epochs: int | None = 1
    max_iters: int | None = None  # optimizer steps; when set, wins over max_epochs
    # ---------------------------------------------------------------- optimizer
    lr: float = 4e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    max_norm: float = 1.0  # gradient clipping; 0 disables it
    nan_policy: str = (
        "stop"  # a NaN/inf loss or gradient: 'stop' (exit 1, naming step and samples) or 'skip' the update
    )
    warm_up_ratio: float = 0.025
    min_lr_ratio: float = 0.15  # cosine floor = lr * min_lr_ratio
    # ---------------------------------------------------------------- checkpoints
    save_steps: int = 500
    save_total_limit: int = 2  # -1 keeps every checkpoint
    export_dtype: str = "float32"  # dtype of the final HF export in WORK_DIR/hf
    # ---------------------------------------------------------------- evaluation
    evaluation_freq: int = 500
    evaluation_inputs: list[str] = field(default_factory=list)
    evaluation_max_new_tokens: int = 64
    SYSTEM: str = ""
    # ---------------------------------------------------------------- runtime
    seed: int = 1024
    dtype: str = "auto"  # compute dtype; master weights stay float32
    # How the compute dtype is applied: 'autocast' (fp32 parameters, cast per op) or 'params'
    # (parameters held in the compute dtype, fp32 masters in the optimizer); auto: params on fsdp2/deepspeed
    mixed_precision: str = "auto"
    # True: recompute each decoder layer in backward (least memory); 'selective': keep the matmul
    # outputs, recompute the cheap ops between them (training/checkpointing.py)
    gradient_checkpointing: bool | str = False
    compile: bool | str = "auto"  # torch.compile each decoder layer; auto: on CUDA (training/compile.py)
    use_varlen_attn: bool | None = None  # None: a varlen kernel on CUDA (PyTorch's own, else flash_attn's)
    attn_implementation: str = "auto"
    doc_masking: str = "auto"
    loss_chunk_tokens: int = 0  # 0: chosen from the vocabulary size
    kernels: str = "auto"  # fused kernels (model/kernels.py): auto (Liger on CUDA when installed), liger, torch
    log_interval: int = 10
    tensorboard: bool = True
    wandb: bool = False  # Weights & Biases (pip install tokentrain[wandb]); WANDB_PROJECT, WANDB_MODE=offline
    fsdp_cpu_offload: bool = False  # FSDP2: parameter shards and optimizer state in host memory
    peak_tflops: float | None = None  # for MFU; None: known GPUs, or measured on CPU
    work_dir: str | None = None
    engine: str = "auto"  # one of engines/specs.py:CHOICES; auto: deepspeed with --deepspeed, ddp on >1 rank
    resume_ignore: list[str] = field(default_factory=list)  # fingerprint keys a resume may differ in (logged)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        return d


REQUIRED = ("pretrained_model_name_or_path",)
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def check_values(cfg: TrainConfig) -> list[tuple[str, str]]:
    """Impossible values as (key, why) pairs; empty when the config can run."""
    bad: list[tuple[str, str]] = []

    def need(cond: bool, key: str, why: str) -> None:
        if not cond:
            bad.append((key, why))

    for key in REQUIRED:
        need(bool(getattr(cfg, key)), key, "must be set")
    need(bool(cfg.dataset_folder) or bool(cfg.datasets), "dataset_folder", "must be set (or datasets = [...])")
    need(
        not (cfg.dataset_folder and cfg.datasets),
        "datasets",
        "set either dataset_folder or datasets, not both (dataset_folder = None for a mixture)",
    )
    need(cfg.max_length > 0, "max_length", "must be > 0")
    need(cfg.max_length <= MAX_LENGTH_LIMIT, "max_length", f"must be <= {MAX_LENGTH_LIMIT} (16M tokens)")
    need(cfg.seed >= 0, "seed", "must be >= 0")
    need(cfg.min_length >= 0, "min_length", "must be >= 0")
    need(cfg.batch_size >= 1, "batch_size", "must be >= 1")
    need(cfg.accumulative_counts >= 1, "accumulative_counts", "must be >= 1")
    need(cfg.dataloader_num_workers >= 0, "dataloader_num_workers", "must be >= 0")
    if cfg.max_iters is None:
        need(cfg.max_epochs is not None and cfg.max_epochs >= 1, "max_epochs", "must be >= 1 (or set max_iters)")
    else:
        need(cfg.max_iters >= 1, "max_iters", "must be >= 1")
    need(cfg.lr > 0, "lr", "must be > 0")
    need(all(0 <= b < 1 for b in cfg.betas), "betas", "each beta must be in [0, 1)")
    need(cfg.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(cfg.max_norm >= 0, "max_norm", "must be >= 0 (0 disables clipping)")
    need(0 <= cfg.warm_up_ratio < 1, "warm_up_ratio", "must be in [0, 1)")
    need(0 <= cfg.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
    need(cfg.save_steps >= 1, "save_steps", "must be >= 1")
    need(
        cfg.save_total_limit == -1 or cfg.save_total_limit >= 1,
        "save_total_limit",
        "must be >= 1, or -1 to keep every checkpoint",
    )
    need(cfg.evaluation_freq >= 1, "evaluation_freq", "must be >= 1")
    need(cfg.evaluation_max_new_tokens >= 1, "evaluation_max_new_tokens", "must be >= 1")
    need(cfg.log_interval >= 1, "log_interval", "must be >= 1")
    need(cfg.loss_chunk_tokens >= 0, "loss_chunk_tokens", "must be >= 0 (0 = automatic)")
    need(cfg.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)} (or fp32/bf16/fp16)")
    need(
        cfg.mixed_precision in MIXED_PRECISION,
        "mixed_precision",
        f"must be one of {', '.join(MIXED_PRECISION)}",
    )
    need(cfg.export_dtype in DTYPES, "export_dtype", f"must be one of {', '.join(DTYPES)}")
    need(
        cfg.attn_implementation in ATTN_IMPLEMENTATIONS,
        "attn_implementation",
        f"must be one of {', '.join(ATTN_IMPLEMENTATIONS)}",
    )
    need(cfg.doc_masking in DOC_MASKING, "doc_masking", f"must be one of {', '.join(DOC_MASKING)}")
    need(cfg.kernels in KERNELS, "kernels", f"must be one of {', '.join(KERNELS)}")
    need(cfg.engine in ENGINES, "engine", f"must be one of {', '.join(ENGINES)}")
    need(
        cfg.gradient_checkpointing in CHECKPOINTING_CHOICES,
        "gradient_checkpointing",
        "must be False, True or 'selective'",
    )
    need(cfg.compile in COMPILE_CHOICES, "compile", "must be 'auto', True or False")
    need(cfg.nan_policy in NAN_POLICIES, "nan_policy", f"must be one of {', '.join(NAN_POLICIES)}")
    need(cfg.peak_tflops is None or cfg.peak_tflops > 0, "peak_tflops", "must be > 0 (or None)")
    need(bool(cfg.file_type), "file_type", "must not be empty")
    return bad
