"""Which attention kernel runs, and how documents in a pack are kept from seeing each other.

A packed row holds several documents; none may attend to another, on any backend.
Three ways to get that, chosen per backend (`doc_masking`):

* ``varlen``    -- flash-attention (CUDA): the batch is flattened to one row of B*L
  tokens and the document boundaries go to the kernel as ``cu_seq_lens_q/k`` (plus the
  restarting ``position_ids``); no mask is materialised. Rows are independent packs, so
  flattening them is exact.
* ``positions`` -- transformers (>= 4.53.1) detects packing from ``position_ids`` that
  restart at 0 and builds the block-diagonal mask itself, but only when no 2D
  ``attention_mask`` is passed *and* no cache exists: we always call with
  ``use_cache=False`` and no ``attention_mask``.
* ``mask4d``    -- we build the (B, 1, L, L) mask ourselves: bool (True = attend) for
  sdpa, additive (0 / dtype-min) for eager, whose kernel *adds* the mask (a bool mask
  there would be silently wrong). Used when the detection above is absent or fails.

Trust but verify: `probe_isolation` runs the real model once on a two-document pack
and checks that the gradient of the second document's output with respect to the first
document's embeddings is exactly zero. ``auto`` takes the first mode whose probe passes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from tokentrain.errors import ConfigError

log = logging.getLogger(__name__)

FLASH_IMPLS = ("flash_attention_2", "flash_attention_3")


def flash_attn_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def choose_attn_implementation(requested: str, device: torch.device, use_varlen_attn: bool | None) -> str:
    """`attn_implementation` for from_pretrained: flash varlen on CUDA when installed, else sdpa."""
    if requested != "auto":
        if requested in FLASH_IMPLS and device.type != "cuda":
            raise ConfigError(
                f"attn_implementation = {requested!r} needs a CUDA device; use 'auto' or 'sdpa' on {device.type}"
            )
        return requested
    cuda = device.type == "cuda"
    if use_varlen_attn is False or not cuda:
        if use_varlen_attn and not cuda:
            log.warning("use_varlen_attn = True but no CUDA device: using sdpa with a block-diagonal mask instead")
        return "sdpa"
    if flash_attn_installed():
        return "flash_attention_2"
    if use_varlen_attn:
        raise ConfigError(
            "use_varlen_attn = True but the flash_attn package is not installed; install it or set "
            "use_varlen_attn = None"
        )
    return "sdpa"


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) document number of each token: a new document starts where positions restart."""
    start = torch.ones_like(position_ids, dtype=torch.bool)
    start[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return start.cumsum(-1)


def block_causal_mask(position_ids: torch.Tensor, additive_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """(B, 1, L, L) causal mask that also blocks attention across documents.

    None when every row is a single document (plain causal: sdpa's fast `is_causal` path).
    Bool (True = attend) by default; additive (0 / finfo.min) in `additive_dtype` if given.
    """
    seg = segment_ids(position_ids)
    if bool((seg[:, -1] == 1).all()):
        return None
    L = position_ids.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=position_ids.device).tril_()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal
    allowed = allowed[:, None]
    if additive_dtype is None:
        return allowed
    neg = torch.finfo(additive_dtype).min
    return torch.zeros(allowed.shape, dtype=additive_dtype, device=allowed.device).masked_fill_(~allowed, neg)


def varlen_kwargs(position_ids: torch.Tensor) -> dict:
    """Flatten (B, L) packs to (1, B*L) with document boundaries for flash-attention varlen."""
    flat = position_ids.reshape(1, -1)
    seg = segment_ids(flat)[0]
    lens = torch.bincount(seg - 1)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32, device=position_ids.device)
    cu[1:] = lens.cumsum(0)
    m = int(lens.max())
    return {"position_ids": flat, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": m, "max_length_k": m}


@dataclass
class DocMasking:
    """How the model is called so that documents stay apart; see the module doc."""

    mode: str  # "varlen" | "positions" | "mask4d"
    attn_implementation: str

    def model_inputs(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, additive_dtype: torch.dtype | None = None
    ) -> dict:
        """Keyword arguments for the model (or its decoder) for one (B, L) micro-batch."""
        if self.mode == "varlen":
            kw = varlen_kwargs(position_ids)
            kw["input_ids"] = input_ids.reshape(1, -1)
            kw["use_cache"] = False
            return kw
        kw = {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}
        if self.mode == "mask4d":
            dtype = additive_dtype if self.attn_implementation == "eager" else None
            if self.attn_implementation == "eager" and dtype is None:
                dtype = torch.float32
            mask = block_causal_mask(position_ids, dtype)
            if mask is not None:
                kw["attention_mask"] = mask
        return kw

    def unflatten(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """Undo the varlen flattening on a (1, B*L, ...) output."""
        return t.reshape(batch, -1, *t.shape[2:]) if self.mode == "varlen" else t


def candidate_modes(attn_implementation: str, requested: str) -> list[str]:
    if requested != "auto":
        if requested == "varlen" and attn_implementation not in FLASH_IMPLS:
            raise ConfigError(
                f"doc_masking = 'varlen' needs a flash-attention implementation, not {attn_implementation!r}"
            )
        if requested != "varlen" and attn_implementation in FLASH_IMPLS:
            raise ConfigError(
                f"doc_masking = {requested!r} does not work with {attn_implementation}; use 'varlen' or 'auto'"
            )
        return [requested]
    if attn_implementation in FLASH_IMPLS:
        return ["varlen"]
    import transformers
    from packaging.version import Version

    modes = ["mask4d"]
    if Version(transformers.__version__) >= Version("4.53.1") and attn_implementation in ("sdpa", "eager"):
        modes.insert(0, "positions")
    return modes


def probe_isolation(
    model, masking: DocMasking, device: torch.device, autocast_dtype: torch.dtype | None = None
) -> float:
    """Max |d out(doc 2) / d embeds(doc 1)| on a real two-document pack; 0.0 means isolated.

    Runs the full model (logits) with the same inputs training uses; masked scores are
    exactly zero after the softmax, so any nonzero gradient is a real leak, in any dtype.
    """
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    n1, n2 = 5, 6
    ids = torch.randint(3, vocab, (1, n1 + n2), generator=g).to(device)
    pos = torch.cat([torch.arange(n1), torch.arange(n2)])[None].to(device)
    kw = masking.model_inputs(ids, pos, additive_dtype=autocast_dtype or next(model.parameters()).dtype)
    emb = model.get_input_embeddings()(kw.pop("input_ids")).detach().requires_grad_(True)
    was_training = model.training
    model.eval()  # no dropout: the probe must be deterministic
    try:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(inputs_embeds=emb, **kw).logits
        out = masking.unflatten(out, 1)
        (grad,) = torch.autograd.grad(out[0, n1:].float().sum(), emb)
    finally:
        model.train(was_training)
    return float(grad.reshape(-1, grad.shape[-1])[:n1].abs().max())


def select_masking(
    model, attn_implementation: str, requested: str, device: torch.device, autocast_dtype: torch.dtype | None = None
) -> DocMasking:
    """The first candidate mode whose isolation probe passes; ConfigError if none does."""
    leaks = {}
    for mode in candidate_modes(attn_implementation, requested):
        masking = DocMasking(mode, attn_implementation)
        try:
            leak = probe_isolation(model, masking, device, autocast_dtype)
        except Exception as e:  # a backend that rejects this way of calling it
            log.debug("document masking %r failed its probe: %s", mode, e)
            leaks[mode] = f"error: {type(e).__name__}: {e}"
            continue
        if leak == 0.0:
            log.debug("document masking: %s (%s)", mode, attn_implementation)
            return masking
        leaks[mode] = f"cross-document gradient {leak:.3g}"
    detail = "; ".join(f"{m}: {why}" for m, why in leaks.items())
    raise ConfigError(
        f"cannot keep documents apart with attn_implementation={attn_implementation!r} ({detail}); "
        "try attn_implementation = 'sdpa' or 'eager'"
    )
