"""Model FLOPs of a training step, with attention counted per document.

Per trained token, the matmuls cost 6 N FLOPs (forward 2 N, backward 4 N), N = the
parameters that multiply activations (all but the input embedding; a tied output
projection counts once). Attention scores and their weighted sum add, per layer and per
document of n tokens, 2 * 2 * n^2 * d forward (QK^T and AV, d = heads * head_dim) halved
by the causal mask, times 3 for forward + backward: 6 * d * n^2 per layer. Documents in a
pack do not attend to each other, so the total uses sum(n_i^2) over documents -- never
max_length^2. Gradient-checkpointing recompute is not counted (these are model FLOPs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Dense bf16 peak TFLOP/s of common accelerators (no sparsity), for MFU.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
    "L4": 121.0,
    "V100": 125.0,
    "4090": 165.0,
    "3090": 71.0,
}


def full_numel(p: torch.Tensor) -> int:
    """Elements of the whole parameter: ZeRO-3 leaves each rank a partition (``numel()`` 0) and
    records the full size as ``ds_numel``; an FSDP2 DTensor's ``numel()`` is already global."""
    return int(getattr(p, "ds_numel", p.numel()))


@dataclass
class FlopCounter:
    matmul_params: int
    layers: int
    attn_dim: int

    @classmethod
    def for_model(cls, model: PreTrainedModel) -> FlopCounter:
        cfg = model.config
        total = sum(full_numel(p) for p in model.parameters())  # shared (tied) tensors counted once
        emb = model.get_input_embeddings().weight
        assert isinstance(emb, torch.Tensor)
        out = model.get_output_embeddings()
        tied = out is not None and out.weight is emb
        matmul = total - (0 if tied else full_numel(emb))
        heads = getattr(cfg, "num_attention_heads", 0)
        head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // max(1, heads))
        return cls(matmul, getattr(cfg, "num_hidden_layers", 0), heads * head_dim)

    def step_flops(self, tokens: int, sum_sq_doc_lengths: int) -> float:
        return 6.0 * self.matmul_params * tokens + 6.0 * self.layers * self.attn_dim * sum_sq_doc_lengths


def sum_sq_doc_lengths(cu_seqlens) -> int:
    """Sum of squared document (fragment) lengths from one sample's cu_seqlens (numpy or torch)."""
    lens = [int(b) - int(a) for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    return sum(n * n for n in lens)


def peak_tflops(device: torch.device, dtype: torch.dtype | None, configured: float | None) -> float | None:
    """Peak TFLOP/s for MFU: the configured one, else the table's for a known GPU (half the
    bf16 figure in tf32), else measured on a CPU; None for an unknown GPU or other device."""
    if configured:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in PEAK_TFLOPS.items():
            if key in name:
                half = dtype in (torch.bfloat16, torch.float16)
                return tf if half else tf / 2
        return None
    if device.type == "cpu":
        return measure_matmul_tflops(dtype or torch.float32)
    return None


def measure_matmul_tflops(dtype: torch.dtype, n: int = 1024, seconds: float = 0.25) -> float:
    """Best sustained square-matmul rate of this CPU in `dtype` (a short, honest peak)."""
    import time

    g = torch.Generator().manual_seed(0)  # leave the global RNG alone
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    a @ b  # warm-up
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        a @ b
        dt = time.perf_counter() - t
        best = max(best, 2 * n**3 / dt / 1e12)
    return best
