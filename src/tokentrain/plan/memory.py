"""Memory per GPU of a run, per engine: an estimate from the model's shape, said to be one.

Model states (P parameters, N ranks, c bytes per compute-dtype element: 2 for bf16/fp16, 4 fp32):

* local / ddp: fp32 weights 4P, fp32 gradients 4P, AdamW m and v 8P; with bf16/fp16 autocast
  its cached low-precision copies of the weights, cP; ddp adds its gradient buckets, 4P.
* fsdp2: weights, gradients and optimizer state sharded, (4 + 4 + 8)P / N, plus the unit being
  gathered and the next one prefetched, 2 x c x (largest layer); with fsdp_cpu_offload the
  shards live in host memory.
* deepspeed ZeRO stage s (bf16/fp16 on: c-byte weights and gradients, fp32 master + m + v =
  12P): stage 0 keeps everything whole, 1 shards the optimizer state, 2 also the gradients,
  3 also the weights (plus two gathered units); offload_optimizer moves the optimizer state
  (and, from stage 2, the gradients' fp32 copy) to the host, offload_param the stage-3 weights.

Activations, per micro-batch of T = batch_size x max_length tokens, for a Llama-like decoder
(h hidden, kv key/value width, i MLP width), saved for the backward pass per token per layer:
16h (two RMSNorms upcast to fp32) + c (5h + 3kv + 4i) (projections' inputs and outputs, rotary
q/k, attention output, SwiGLU). Attention kernels that are linear in memory (sdpa's flash and
memory-efficient kernels, varlen, flex) save O(T) more; eager attention saves its probabilities,
c x heads x max_length^2 per sample per layer, twice. Gradient checkpointing keeps only each
layer's fp32 input (4h) plus one layer's activations being recomputed; 'selective' also keeps
the outputs of the layer's matmuls and attention (training/checkpointing.py), c (4h + 2kv + 2i):
q, k, v, attention, o, gate, up and down, and recomputes the norms, rotary and SwiGLU product. The loss head: fused
(model/loss.py) keeps the hidden states and their gradient (8h per token), an fp32 weight
gradient (4 x vocab x h) and one chunk of fp32 logits; unfused, the logits in c bytes plus a
chunk. Not counted: the CUDA context and kernels' workspaces (~1 GiB), allocator fragmentation,
communication buckets -- leave headroom.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokentrain.plan.shape import ModelShape

GiB = 1 << 30


@dataclass
class EngineMemory:
    engine: str  # as the plan names it (Setup.label): "ddp", "deepspeed ZeRO-3 + offload", ...
    params: float  # bytes per GPU
    grads: float
    optimizer: float
    activations: float
    host: float  # bytes of host memory per rank (offload)

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations

    def as_dict(self) -> dict:
        return {
            "engine": self.engine,
            "params": self.params,
            "grads": self.grads,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "total": self.total,
            "host": self.host,
        }


@dataclass(frozen=True)
class Shape:
    """What the activation estimate needs of a run."""

    batch_size: int
    max_length: int
    compute_bytes: int  # c: 2 (bf16/fp16) or 4 (fp32)
    gradient_checkpointing: bool | str  # False, True or 'selective'
    eager_attention: bool
    chunk_tokens: int  # the loss's chunk (model/loss.py)


def saved_and_transient(m: ModelShape, s: Shape) -> tuple[float, float]:
    """(bytes one micro-batch saves for its backward pass, bytes that exist only for a while: the
    loss's logit chunks, the layer being recomputed under gradient checkpointing)."""
    c, h, t = s.compute_bytes, m.hidden, s.batch_size * s.max_length
    per_layer = t * (16 * h + c * (5 * h + 3 * m.kv_dim + 4 * m.intermediate))
    if s.eager_attention:
        per_layer += 2 * c * m.heads * s.batch_size * s.max_length**2
    if s.gradient_checkpointing == "selective":
        layers = m.layers * t * (4 * h + c * (4 * h + 2 * m.kv_dim + 2 * m.intermediate))
    elif s.gradient_checkpointing:
        layers = m.layers * t * 4 * h
    else:
        layers = m.layers * per_layer
    head = t * 8 * h + 4 * m.vocab * h if m.fused_loss else t * c * m.vocab
    chunks = 2 * min(t, s.chunk_tokens) * m.vocab * 4  # fp32 logits and their gradient, one chunk
    return float(layers + t * 4 * h + head), float(chunks + (per_layer if s.gradient_checkpointing else 0))


def activation_bytes(m: ModelShape, s: Shape) -> float:
    """The activations of one micro-batch at their peak (see the module docstring)."""
    return sum(saved_and_transient(m, s))


@dataclass(frozen=True)
class Setup:
    """One way to run: an engine with its sharding and offload."""

    engine: str  # local, ddp, fsdp2, deepspeed
    zero: int = 0  # deepspeed's ZeRO stage
    offload: bool = False  # fsdp_cpu_offload; deepspeed's offload_optimizer
    offload_param: bool = False  # deepspeed's offload_param (stage 3)

    @property
    def label(self) -> str:
        off = " + offload" if self.offload or self.offload_param else ""
        return f"deepspeed ZeRO-{self.zero}{off}" if self.engine == "deepspeed" else f"{self.engine}{off}"


def engine_memory(m: ModelShape, s: Shape, world: int, setup: Setup) -> EngineMemory:
    """Model states and activations per GPU of one engine at `world` ranks."""
    p, n, c, zero = float(m.params), max(1, world), s.compute_bytes, setup.zero
    act = activation_bytes(m, s)
    gathered = 2 * c * m.largest_layer_params  # the unit in use and the one prefetched
    if setup.engine in ("local", "ddp"):
        buckets = 4 * p if setup.engine == "ddp" else 0.0
        cast = c * p if c < 4 else 0.0  # autocast's low-precision weight copies
        return EngineMemory(setup.label, 4 * p + cast, 4 * p + buckets, 8 * p, act, 0.0)
    if setup.engine == "fsdp2":
        if setup.offload:
            return EngineMemory(setup.label, gathered, 0.0, 0.0, act, 16 * p / n)
        return EngineMemory(setup.label, 4 * p / n + gathered, 4 * p / n, 8 * p / n, act, 0.0)
    # deepspeed: c-byte weights and gradients (fp32 when neither bf16 nor fp16), 12P optimizer
    weights = c * p / n + gathered if zero == 3 else c * p
    grads = c * p / n if zero >= 2 else c * p
    optim = 12 * p / n if zero >= 1 else 12 * p
    host = 0.0
    if setup.offload:
        host += optim + (4 * p / n if zero >= 2 else 0.0)
        optim = 0.0
    if setup.offload_param and zero == 3:
        host += c * p / n
        weights = gathered
    return EngineMemory(setup.label, weights, grads, optim, act, host)


def setups(chosen: Setup, world: int) -> list[Setup]:
    """The run's own engine first, then the others one could pick instead."""
    others = [
        Setup("ddp" if world > 1 else "local"),
        Setup("fsdp2"),
        Setup("fsdp2", offload=True),
        Setup("deepspeed", 2),
        Setup("deepspeed", 3),
        Setup("deepspeed", 3, True, True),
    ]
    return [chosen] + [o for o in others if o.label != chosen.label]


def deepspeed_setup(ds: dict) -> Setup:
    """The Setup a DeepSpeed config describes: its stage and what it offloads to the host."""
    from tokentrain.engines.deepspeed_config import zero_stage

    zero = ds.get("zero_optimization", {})

    def on(key: str) -> bool:
        section = zero.get(key)
        return isinstance(section, dict) and section.get("device", "none") not in ("none", None)

    return Setup("deepspeed", zero_stage(ds), on("offload_optimizer"), on("offload_param"))
