"""The model as the engine sees it: HF causal LM + document masking + summed loss, one module.

`CausalLMWithLoss.forward(input_ids, labels, position_ids)` returns the fp32 *sum* of
cross-entropy over target tokens. It is the module DDP (or later DeepSpeed) wraps, so
the whole forward -- decoder, masking, loss -- runs inside the wrapper's hooks.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from tokentrain.errors import ConfigError, TokentrainError, first_line
from tokentrain.model.attention import DocMasking
from tokentrain.model.kernels import Kernels, apply_kernels
from tokentrain.model.kernels import linear_cross_entropy_sum as liger_linear_cross_entropy_sum
from tokentrain.model.loss import linear_cross_entropy_sum, logits_cross_entropy_sum
from tokentrain.utils.dtypes import torch_dtype

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

log = logging.getLogger(__name__)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The compute dtype for autocast (None: plain fp32). 'auto': bf16 on a GPU that has it,
    fp32 elsewhere -- on CPU autocast bf16 is slower than fp32 for the models one trains there
    (measured: docs/benchmarks.md, "dtype on CPU"), and it rounds."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        return None
    if name == "float16" and device.type == "cpu":
        raise ConfigError("dtype = 'float16' is not supported on CPU; use 'bfloat16' or 'float32'")
    return None if name == "float32" else torch_dtype(name)


def _raised_by_engine(e: BaseException) -> bool:
    """Whether an error came from inside an engine library (DeepSpeed's zero.Init, torch's
    distributed layer) rather than from reading the model folder."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    return any(("/deepspeed/" in f.filename or "/torch/distributed/" in f.filename) for f in frames)


def load_tokenizer(path: str, trust_remote_code: bool, named: str = ""):
    """The model's tokenizer, with a pad token; `named`: how an error names `path` (default: as
    the config's setting)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        named = named or f"pretrained_model_name_or_path = {path!r}"
        raise ConfigError(f"{named}: cannot load the tokenizer: {first_line(e)}") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def has_weights(path: str) -> bool:
    """False only for a local folder that has a config but no weight files (train from scratch)."""
    from pathlib import Path

    p = Path(path)
    if not (p.is_dir() and (p / "config.json").is_file()):
        return True
    return any((p / f).is_file() for f in WEIGHT_FILES) or any(p.glob("*.safetensors"))


def read_config(path: str, trust_remote_code: bool) -> PretrainedConfig:
    """The model's HF config, read in this one place: a config.json that is no JSON or names a
    model_type transformers does not know is one ConfigError naming the file, whatever the engine."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ConfigError(
            f"pretrained_model_name_or_path = {path!r}: cannot read its config.json: {first_line(e)}"
        ) from None


def vocab_size(config: PretrainedConfig) -> int:
    """The vocabulary the model's embedding will have, from its config (multimodal configs keep
    it in their text config); 0 when the config does not say."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "vocab_size", 0) or 0)


# Model types whose positions are a learned table of fixed size: a position past its end has
# no embedding (an index error mid-run), so a longer max_length is refused, not extrapolated.
LEARNED_POSITIONS = frozenset({"gpt2", "gpt_bigcode", "gpt_neo", "opt", "biogpt"})


def check_positions(path: str, trust_remote_code: bool, max_length: int) -> str | None:
    """A `max_length` beyond the model's positions, found from config.json before any weights
    load: a ConfigError for learned absolute positions (they cannot extrapolate), else the
    warning to log (rotary positions run past the trained length, usually with a worse loss).
    None when it fits, or when the config cannot be read (`load_model` then says why)."""
    try:
        cfg = read_config(path, trust_remote_code)
    except ConfigError:
        return None
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    key = "n_positions" if hasattr(cfg, "n_positions") else "max_position_embeddings"
    n = getattr(cfg, key, None)
    if not isinstance(n, int) or max_length <= n:
        return None
    what = f"max_length = {max_length} is beyond the model's {n} positions ({key} in {path}/config.json)"
    kind = getattr(cfg, "model_type", "")
    if kind in LEARNED_POSITIONS:
        raise ConfigError(f"{what}: {kind} learns absolute positions and cannot extrapolate; set max_length <= {n}")
    scaling = getattr(cfg, "rope_scaling", None)
    scaling = scaling if isinstance(scaling, dict) else {}
    rope = scaling.get("rope_type", scaling.get("type"))
    if rope and rope != "default":
        how = f"its rope scaling ({rope}, factor {scaling.get('factor')}) extrapolates past {n}"
    else:
        how = f"positions past {n} are extrapolated with no rope scaling (expect a worse loss there)"
    return f"{what}: {how}"


def soft_caps_attention(path: str, trust_remote_code: bool) -> bool:
    """Whether the model's config soft-caps attention scores (gemma2): no varlen kernel of
    PyTorch's can, so 'auto' picks flex_attention on CUDA. False when the config cannot be
    read (`load_model` then says why)."""
    try:
        cfg = read_config(path, trust_remote_code)
    except ConfigError:
        return False
    return attention_cap(cfg) is not None


def attention_cap(config: PretrainedConfig) -> float | None:
    """The soft-cap on attention scores (gemma2's ``attn_logit_softcapping``); None without one."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "attn_logit_softcapping", None) or None


def refuse_uncapped_sdpa(config: PretrainedConfig, attn_implementation: str) -> None:
    """sdpa cannot soft-cap scores. Recent transformers refuse sdpa for such a model; older ones
    (5.17, the GPU image's) load gemma2 with it and drop the cap without a word -- a different
    model. So it is refused here, whatever transformers is installed."""
    cap = attention_cap(config)
    if attn_implementation == "sdpa" and cap is not None:
        raise ValueError(
            f"{getattr(config, 'model_type', 'the model')} soft-caps its attention scores (attn_logit_softcapping = "
            f"{cap}), which sdpa does not support: set attn_implementation = 'eager' (or 'flex' on CUDA)"
        )


def running_attention(config: PretrainedConfig) -> dict[str, str]:
    """from_pretrained keywords for a model run outside training (chat, eval): transformers'
    default attention, but eager for a model that soft-caps its scores, which older
    transformers (5.17) would give sdpa, dropping the cap (`refuse_uncapped_sdpa`)."""
    return {"attn_implementation": "eager"} if attention_cap(config) is not None else {}


# Initialises the given modules of the model being built (allocated, whole), by name: `init_by_name`.
Initialise = Callable[[list[nn.Module]], None]
# An engine's placement step (FSDP2: shard): `hook(model, init)` takes the freshly built model
# instead of it being moved to the device; `init` given: the model is on the meta device, the
# hook allocates it part by part and calls `init` on each part before sharding it.
ShardHook = Callable[[nn.Module, Initialise | None], None]


def load_model(
    path: str,
    trust_remote_code: bool,
    attn_implementation: str,
    device: torch.device,
    seed: int = 0,
    fallback: str | None = None,
    shard: ShardHook | None = None,
    kernels: Kernels | None = None,
) -> PreTrainedModel:
    """The HF model in fp32 (the master weights; compute runs in the autocast dtype): the one
    builder of every engine, so a folder it cannot read gives the same one-line error on each.

    A local folder with a config.json but no weights starts from random weights: training from
    scratch. Each module is initialised by name from `seed` (model/init.py), so every engine and
    world size starts from the same weights; the log gives their digest. When the model refuses
    `attn_implementation` (gemma2 has no sdpa: sdpa cannot soft-cap) and a `fallback` is
    given ('auto' chose the implementation), it is loaded with the fallback, logged; the
    implementation in use is ``model.config._attn_implementation``.

    `shard` (FSDP2's): the model is handed to it rather than moved to `device` -- loaded whole
    on the host when the folder has weights; else built on the meta device and materialised
    by the hook unit by unit, each initialised by name, so the whole model never exists on one
    rank. ZeRO-3 needs no hook: transformers' zero.Init partitions the model as it is built, and
    `init_by_name` gathers one module at a time.

    `kernels` (model/kernels.py): Liger's fused modules are patched into the model as built,
    before it is placed or sharded; its parameters are unchanged.
    """
    from tokentrain.model.init import digest, init_by_name

    config = read_config(path, trust_remote_code)
    scratch = not has_weights(path)
    if scratch:
        how = ", building it sharded" if shard else ""
        log.info("%s has a config but no weights: training from scratch (random init, seed %d%s)", path, seed, how)
    meta = scratch and shard is not None
    try:
        model = _build(path, config, trust_remote_code, attn_implementation, scratch, meta)
    except ConfigError as e:
        refused = "does not support an attention implementation" in str(e) or "attn_implementation" in str(e)
        if fallback is None or fallback == attn_implementation or not refused:
            raise
        log.info(
            "%s; loading it with attn_implementation = %r instead",
            str(e).split(": cannot load the model: ")[-1],
            fallback,
        )
        model = _build(path, config, trust_remote_code, fallback, scratch, meta)
    model.config.use_cache = False
    if kernels is not None:
        apply_kernels(model, kernels)
    samples: dict[str, bytes] = {}
    if scratch and not meta:
        samples = init_by_name(model, seed)
    if shard is None:
        model = model.to(device)  # type: ignore[arg-type]  # transformers' decorator stub drops `self`
    else:
        shard(model, (lambda modules: samples.update(init_by_name(model, seed, modules))) if meta else None)
    if samples:  # ZeRO-3: rank 0 initialised, the others hold none
        log.info("init: %d tensors initialised by name from seed %d, digest %s", len(samples), seed, digest(samples))
    return model


def _build(
    path: str,
    config: PretrainedConfig,
    trust_remote_code: bool,
    attn_implementation: str,
    scratch: bool,
    meta: bool,
) -> PreTrainedModel:
    """from_pretrained, or from_config for a config-only folder (`scratch`: its weights left for
    `init_by_name`, tied; `meta`: on the meta device, for a hook to materialise); a failure is one
    ConfigError (or the engine's)."""
    from transformers import AutoModelForCausalLM

    from tokentrain.model.init import no_init_weights

    impl, remote = attn_implementation, trust_remote_code
    try:
        refuse_uncapped_sdpa(config, impl)
        if not scratch:
            return AutoModelForCausalLM.from_pretrained(
                path, config=config, dtype=torch.float32, attn_implementation=impl, trust_remote_code=remote
            )
        config = copy.deepcopy(config)  # from_config sets dtype and attention on it: a retry starts clean
        with torch.device("meta") if meta else no_init_weights():
            model = AutoModelForCausalLM.from_config(
                config, dtype=torch.float32, attn_implementation=impl, trust_remote_code=remote
            )
        model.tie_weights()  # no_init_weights skips the tying too
        return model
    except Exception as e:
        if _raised_by_engine(e):  # not the folder's fault: say so, exit 1 (not a usage error)
            raise TokentrainError(
                f"the training engine failed while building the model of {path!r}: {first_line(e)}"
            ) from None
        raise ConfigError(f"pretrained_model_name_or_path = {path!r}: cannot load the model: {first_line(e)}") from None


def fused_parts(model: PreTrainedModel) -> tuple[nn.Module, nn.Linear] | None:
    """(decoder, lm_head) when logits are plainly lm_head(decoder(x)); else None."""
    cfg = model.config
    if any(
        getattr(cfg, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")
    ):
        return None
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or decoder is model or not isinstance(head, nn.Linear):
        return None
    return decoder, head


class CausalLMWithLoss(nn.Module):
    """`liger`: the fused loss head is Liger's fused linear cross-entropy (model/kernels.py)
    instead of ours (model/loss.py); same rule, same result."""

    def __init__(
        self,
        model: PreTrainedModel,
        masking: DocMasking,
        compute_dtype: torch.dtype | None,
        chunk_tokens: int = 0,
        liger: bool = False,
    ):
        super().__init__()
        self.model = model
        self.masking = masking
        self.compute_dtype = compute_dtype
        self.chunk_tokens = chunk_tokens
        self.liger = liger
        self.fused = self._check_fused()

    def _check_fused(self) -> bool:
        """Use the fused head only if lm_head(decoder(x)) reproduces model(x).logits here, on a
        two-document pack called exactly as training calls it (varlen needs its boundaries)."""
        parts = fused_parts(self.model)
        if parts is None:
            return False
        decoder, head = parts
        dev = head.weight.device
        ids = torch.arange(3, 11, device=dev)[None] % head.weight.shape[0]
        pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]], device=dev)
        cu = torch.tensor([[0, 3, 8]], dtype=torch.int32, device=dev)
        kw = self.masking.model_inputs(ids, pos, self.compute_dtype or torch.float32, cu)
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                ref = self.model(**kw).logits
                hid = decoder(**kw)[0]
                ok = torch.allclose(head(hid), ref, rtol=1e-4, atol=1e-5)
        except Exception as e:
            log.warning("loss: the fused loss head failed its check (%s: %s)", type(e).__name__, first_line(e))
            ok = False
        finally:
            self.model.train(was)
        if not ok:
            log.info(
                "loss: model logits are not lm_head(decoder(x)); computing the loss from full logits (chunked fp32)"
            )
        return ok

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        max_doc: int | None = None,
    ) -> torch.Tensor:
        """`cu_seqlens`: (B, K) per row, or flat with `max_doc` (`Batch.doc_bounds`); `targets`:
        the flat target positions (`Batch.targets`). Training passes all three, counted on the
        host, so that a micro-batch reads nothing back from the GPU."""
        dev = input_ids.device.type
        kw = self.masking.model_inputs(
            input_ids, position_ids, self.compute_dtype or torch.float32, cu_seqlens, max_doc
        )
        with torch.autocast(dev, dtype=self.compute_dtype, enabled=self.compute_dtype is not None):
            if self.fused:
                parts = fused_parts(self.model)
                assert parts is not None, "_check_fused found them"
                decoder, head = parts
                hidden = decoder(**kw)[0]
                if self.liger:
                    return liger_linear_cross_entropy_sum(
                        hidden, labels, head.weight, head.bias, self.compute_dtype, targets
                    )
                return linear_cross_entropy_sum(
                    hidden, labels, head.weight, head.bias, self.chunk_tokens, self.compute_dtype, targets
                )
            logits = self.model(**kw).logits
            return logits_cross_entropy_sum(logits, labels, self.chunk_tokens, targets)
