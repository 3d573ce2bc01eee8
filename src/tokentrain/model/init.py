"""Random initial weights keyed by name: the same model from the same seed on every engine.

Training from scratch (a config-only folder) used to draw the initial weights from one RNG
stream in build order, and each engine builds in its own order -- whole on the host (local,
DDP, ZeRO-1/2), partitioned under zero.Init (ZeRO-3), unit by unit from the meta device
(FSDP2) -- so the same seed gave three different models. Here every module is initialised by
the model's own ``_init_weights`` (what transformers' ``initialize_weights`` applies to each
module) from a stream seeded with a stable hash of (seed, the module's qualified name): a
parameter's initial value depends only on the seed, its name and the config, whatever the
engine, world size, device or the order in which the modules come.

The draws are always made on the CPU in fp32 (a tensor elsewhere is initialised on a CPU
copy and copied back): CUDA's generator and a bf16 draw give other numbers. A tensor shared
by two modules (tied embeddings) is initialised once, by the first of them in post-order
(children before their parent, as transformers does): ``embed_tokens``, then ``lm_head``
leaves it alone. ZeRO-3 parameters are gathered one module at a time, rank 0 initialises
them and DeepSpeed broadcasts its values on leaving the gather; the whole model is never
on one rank.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

FLAG = "_is_hf_initialized"  # transformers' init functions leave a tensor with this flag alone
SAMPLE = 64  # elements of each tensor that enter the digest (strided over the whole tensor)


def module_seed(seed: int, name: str) -> int:
    """The RNG seed of module `name`: 63 bits of sha256(seed, name) (stable across processes and
    Python versions, unlike hash())."""
    h = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def post_order(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(qualified name, module, the PreTrainedModel whose ``_init_weights`` applies to it), children
    before parents: transformers' ``smart_apply`` order, a sub-model dispatching to its own init."""
    from transformers import PreTrainedModel

    out: list[tuple[str, nn.Module, nn.Module]] = []
    seen: set[int] = set()

    def visit(prefix: str, module: nn.Module, owner: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        owner = module if isinstance(module, PreTrainedModel) else owner
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child, owner)
        out.append((prefix, module, owner))

    visit("", model, model)
    return out


def init_by_name(model: nn.Module, seed: int, modules: list[nn.Module] | None = None) -> dict[str, bytes]:
    """Initialise `modules` (default: all) of `model` by name, in place; return a small sample of
    each initialised tensor by qualified name (for `digest`; empty on ZeRO-3 ranks other than 0).

    `modules`: a part of the model whose tensors are allocated (FSDP2: one unit before it is
    sharded); the values do not depend on how the model is cut into such parts."""
    chosen = None if modules is None else {id(m) for m in modules}
    samples: dict[str, bytes] = {}
    first: dict[int, tuple[torch.Tensor, str]] = {}  # initialised tensors (kept alive: ids stay unique), first name
    with torch.random.fork_rng(devices=[]), torch.no_grad(), _guarded():
        for name, module, owner in post_order(model):
            if chosen is not None and id(module) not in chosen:
                continue
            # _init_weights may write its direct children's tensors too (transformers gathers them for ZeRO-3)
            kids = [module] + [c for c in module.children() if chosen is None or id(c) in chosen]
            before = _tensors(name, module, kids)
            with _gathered([t for _, t in before if isinstance(t, nn.Parameter)]) as mine:
                if not mine:
                    continue
                tied = {id(t) for n, t in before if id(t) in first and n.rpartition(".")[0] == name}
                with _on_cpu_fp32(kids):
                    now = _tensors(name, module, kids)  # buffers may be CPU copies now; parameters are the same
                    for (_, t), (_, o) in zip(now, before, strict=True):
                        _flag(t, id(o) in tied)  # a tied tensor another module initialised: left alone
                    torch.default_generator.manual_seed(module_seed(seed, name))
                    owner._init_weights(module)  # type: ignore[operator]
                    for (n, t), (_, o) in zip(now, before, strict=True):
                        _flag(t, False)
                        if n.rpartition(".")[0] == name:
                            first.setdefault(id(o), (o, n))
                        if id(o) in first:
                            samples[first[id(o)][1]] = _sample(t)
    return samples


def no_init_weights() -> contextlib.AbstractContextManager:
    """transformers' context that builds a model without initialising it (`init_by_name` does)."""
    import importlib

    try:
        module = importlib.import_module("transformers.initialization")  # transformers 5
    except ImportError:
        module = importlib.import_module("transformers.modeling_utils")  # transformers 4
    return module.no_init_weights()


def _guarded() -> contextlib.AbstractContextManager:
    """torch.nn.init functions that respect FLAG, as transformers 5 runs `_init_weights` (4 has none)."""
    try:
        from transformers.initialization import guard_torch_init_functions
    except ImportError:
        return contextlib.nullcontext()
    return guard_torch_init_functions()


def digest(samples: dict[str, bytes]) -> str:
    """Eight hex digits over the samples in name order: equal digests, equal initial weights
    (up to the sampled elements), whatever order the engine initialised them in."""
    h = hashlib.sha256()
    for name in sorted(samples):
        h.update(name.encode() + b"\0" + samples[name])
    return h.hexdigest()[:8]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _tensors(prefix: str, module: nn.Module, kids: list[nn.Module]) -> list[tuple[str, torch.Tensor]]:
    """The parameters and buffers held directly by each of `kids` (children of `module`, named
    `prefix`, or `module` itself), by qualified name."""
    names = {id(c): _join(prefix, n) for n, c in module.named_children()} | {id(module): prefix}
    out = []
    for m in kids:
        own = [*m._parameters.items(), *m._buffers.items()]
        out += [(_join(names[id(m)], n), t) for n, t in own if t is not None]
    return out


def _flag(t: torch.Tensor, on: bool) -> None:
    """Mark a tensor initialised (transformers' init functions then skip it) or clear the mark."""
    if on:
        setattr(t, FLAG, True)
    elif hasattr(t, FLAG):
        delattr(t, FLAG)


def _sample(t: torch.Tensor) -> bytes:
    """Shape, dtype and SAMPLE elements strided over the tensor, as fp32 bytes: cheap and exact."""
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLE)
    picked = flat[::step][:SAMPLE].to("cpu", torch.float32) if flat.is_floating_point() else flat[:SAMPLE].cpu()
    return repr(tuple(t.shape)).encode() + picked.numpy().tobytes()


@contextlib.contextmanager
def _gathered(params: list[nn.Parameter]) -> Iterator[bool]:
    """ZeRO-3 partitioned parameters whole for the duration, rank 0's values kept; yields whether
    this rank initialises them (all ranks must enter). Other parameters: as they are."""
    if not any(hasattr(p, "ds_id") for p in params):
        yield True
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield deepspeed.comm.get_rank() == 0


@contextlib.contextmanager
def _on_cpu_fp32(modules: list[nn.Module]) -> Iterator[None]:
    """The floating tensors held directly by `modules` that are not fp32 on the CPU are replaced by
    fp32 CPU copies for the duration and the results copied back: the same draws on any device."""
    moved: list[tuple[Any, str, torch.Tensor]] = []  # (holder, kind, original)
    for m in modules:
        for p in m._parameters.values():
            if p is not None and _needs_copy(p):
                moved.append((p, "data", p.data))
                p.data = p.data.to("cpu", torch.float32)
        for n, b in m._buffers.items():
            if b is not None and _needs_copy(b):
                moved.append((m, n, b))
                m._buffers[n] = b.to("cpu", torch.float32)
    try:
        yield
    finally:
        for holder, kind, original in moved:
            if kind == "data":
                original.copy_(holder.data)
                holder.data = original
            else:
                original.copy_(holder._buffers[kind])
                holder._buffers[kind] = original


def _needs_copy(t: torch.Tensor) -> bool:
    return t.is_floating_point() and (t.device.type != "cpu" or t.dtype != torch.float32)
