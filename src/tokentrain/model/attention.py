"""Which attention kernel runs, and how documents in a pack are kept from seeing each other.

A packed row holds several documents; none may attend to another, on any backend.
Four ways to get that, chosen per backend (`doc_masking`):

* ``varlen``    -- a varlen kernel (CUDA): PyTorch's own (`tokentrain.model.varlen`, chosen
  by ``auto``) or flash_attn's. The batch is flattened to one row of B*L tokens and the
  batch's ``cu_seqlens`` go to the kernel as ``cu_seq_lens_q/k`` (plus the restarting
  ``position_ids``); no mask is materialised. Rows are independent packs, so flattening
  them is exact.
* ``flex``      -- PyTorch's flex_attention (`tokentrain.model.flex`): a document
  ``BlockMask`` per micro-batch (and per sliding window), soft-capping as a score_mod; fused
  on CUDA (chosen by ``auto`` there for models that soft-cap, which the varlen kernel cannot;
  CUDA only: flex has no backward on CPU).
* ``positions`` -- transformers (>= 4.53.1) detects packing from ``position_ids`` that
  restart at 0 and builds the block-diagonal mask itself, but only when no 2D
  ``attention_mask`` is passed *and* no cache exists: we always call with
  ``use_cache=False`` and no ``attention_mask``.
* ``mask4d``    -- we build the (B, 1, L, L) mask ourselves: bool (True = attend) for
  sdpa, additive (0 / dtype-min) for eager, whose kernel *adds* the mask (a bool mask
  there would be silently wrong). Used when the detection above is absent or fails.
  Sliding windows are in the mask: one window for the whole model (mistral, phi3,
  starcoder2), or a mask per layer type (``{"full_attention": .., "sliding_attention": ..}``,
  gemma2/3, qwen2, cohere2), which transformers passes to each layer as it is.

Trust but verify, at start-up on the real model, through the inputs training uses:
`probe_isolation` checks that the gradient of the second document's output with respect to
the first document's embeddings is exactly zero; `probe_causality` that no output depends on a
later token of its own document (a kernel called without its causal flag isolates documents
and agrees packed-vs-alone: only this catches it); `probe_logits` that on a pack of documents
longer than the model's sliding window each document's logits equal the document run alone (a
mask without the window leaks nothing between documents, so only this catches it).

``auto`` never strands a run: when the implementation it chose raises or fails a probe, the
loaded model is switched to the next of `fallback_chain` (varlen -> flex -> sdpa -> eager,
each with its masking modes), one line names what failed and what trains instead. An explicit
request fails in one line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from tokentrain.errors import ConfigError, first_line
from tokentrain.model.flex import FLEX_IMPL, FLEX_MASKS, flex_available
from tokentrain.model.masks import block_causal_mask, document_block_masks, segment_ids
from tokentrain.model.varlen import VARLEN_IMPL, flat_cu_seqlens, varlen_available

log = logging.getLogger(__name__)

FLASH_IMPLS = ("flash_attention_2", "flash_attention_3")
VARLEN_IMPLS = (*FLASH_IMPLS, VARLEN_IMPL)  # implementations called with cu_seq_lens (mode varlen)


def flash_attn_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def choose_attn_implementation(
    requested: str, device: torch.device, use_varlen_attn: bool | None, soft_capped: bool = False
) -> str:
    """`attn_implementation` for from_pretrained. 'auto': on CUDA PyTorch's varlen kernel (else
    flash_attn's when installed) -- or flex_attention for a model that soft-caps its scores
    (`soft_capped`), which no varlen kernel of PyTorch's does -- elsewhere sdpa (`load_model`
    falls back to eager for models without sdpa). 'varlen' and 'flex' are PyTorch's kernels."""
    if requested == "varlen":
        requested = VARLEN_IMPL
    if requested == "flex":
        if not flex_available() or device.type != "cuda":
            raise ConfigError(
                "attn_implementation = 'flex' needs torch.nn.attention.flex_attention (torch >= 2.5) on a CUDA "
                f"device (it has no backward on {device.type}); use 'auto' or 'sdpa'"
            )
        return FLEX_IMPL
    if requested != "auto":
        if requested == VARLEN_IMPL and not varlen_available(device):
            raise ConfigError(
                "attn_implementation = 'varlen' needs torch.nn.attention.varlen (torch >= 2.10) and a CUDA GPU of "
                f"compute capability >= 8.0 (here: {device.type}); use 'auto' or 'sdpa'"
            )
        if requested in FLASH_IMPLS and device.type != "cuda":
            raise ConfigError(
                f"attn_implementation = {requested!r} needs a CUDA device; use 'auto' or 'sdpa' on {device.type}"
            )
        return requested
    cuda = device.type == "cuda"
    if use_varlen_attn is False:
        return "sdpa"
    if soft_capped and use_varlen_attn is None and cuda and flex_available():
        return FLEX_IMPL
    if varlen_available(device):
        return VARLEN_IMPL
    if cuda and flash_attn_installed():
        return "flash_attention_2"
    if use_varlen_attn and cuda:
        raise ConfigError(
            "use_varlen_attn = True but neither torch.nn.attention.varlen (torch >= 2.10, compute capability >= 8) "
            "nor the flash_attn package is available; set use_varlen_attn = None"
        )
    if use_varlen_attn:
        log.warning("use_varlen_attn = True but no CUDA device: using sdpa with a block-diagonal mask instead")
    return "sdpa"


def auto_attention(cfg) -> bool:
    """Whether the config leaves the attention path to tokentrain (so a failing one may be
    replaced): ``attn_implementation``, ``doc_masking`` 'auto' and varlen not demanded."""
    return cfg.attn_implementation == "auto" and cfg.doc_masking == "auto" and cfg.use_varlen_attn is not True


FALLBACK_ORDER = (VARLEN_IMPL, FLEX_IMPL, "sdpa", "eager")


def fallback_chain(first: str, device: torch.device) -> list[str]:
    """The implementations ``auto`` tries, in order: `first` (what it chose), then those after it
    in `FALLBACK_ORDER` that can run here (varlen -> flex on CUDA -> sdpa -> eager)."""
    usable = {VARLEN_IMPL: varlen_available(device), FLEX_IMPL: flex_available() and device.type == "cuda"}
    start = FALLBACK_ORDER.index(first) + 1 if first in FALLBACK_ORDER else 0
    return [first] + [i for i in FALLBACK_ORDER[start:] if usable.get(i, True) and i != first]


def switch_implementation(model, impl: str) -> None:
    """Make a loaded model call `impl` in every attention layer from now on (transformers reads
    the config's implementation at each call, so the weights stay where they are)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # transformers < 4.56
        model.config._attn_implementation = impl
    if model.config._attn_implementation != impl:
        raise ValueError(f"the model kept {model.config._attn_implementation!r}")


def attention_windows(config) -> int | dict[str, int | None] | None:
    """The sliding windows a model's layers use, as `block_causal_mask` needs them: a dict by
    layer type when layers differ (``config.layer_types``), one window for all, or None."""
    w = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types and "sliding_attention" in types:
        return {t: (w if t == "sliding_attention" else None) for t in sorted(set(types))}
    return w or None


def largest_window(windows) -> int | None:
    if isinstance(windows, dict):
        return max((w for w in windows.values() if w), default=None)
    return windows


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

    mode: str  # "varlen" | "flex" | "positions" | "mask4d"
    attn_implementation: str
    windows: int | dict[str, int | None] | None = None  # `attention_windows` of the model (mask4d builds them in)

    def model_inputs(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        additive_dtype: torch.dtype | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_doc: int | None = None,
    ) -> dict:
        """Keyword arguments for the model (or its decoder) for one (B, L) micro-batch;
        `cu_seqlens` (the batch's, (B, K)) spares varlen re-deriving them from positions. In
        training they come already flat ((D + 1,), `Batch.doc_bounds`) with their longest
        document `max_doc` counted on the host: nothing is read back from the device."""
        if self.mode == "varlen":
            if cu_seqlens is None:
                kw = varlen_kwargs(position_ids)
            else:
                if cu_seqlens.ndim == 1 and max_doc is not None:
                    cu, m = cu_seqlens, max_doc
                else:
                    cu, m = flat_cu_seqlens(cu_seqlens, position_ids.shape[1])
                kw = {
                    "position_ids": position_ids.reshape(1, -1),
                    "cu_seq_lens_q": cu,
                    "cu_seq_lens_k": cu,
                    "max_length_q": m,
                    "max_length_k": m,
                }
            kw["input_ids"] = input_ids.reshape(1, -1)
            kw["use_cache"] = False
            return kw
        kw = {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}
        if self.mode == "flex":
            kw[FLEX_MASKS] = document_block_masks(position_ids, self.windows)
        elif self.mode == "mask4d":
            dtype = additive_dtype if self.attn_implementation == "eager" else None
            if self.attn_implementation == "eager" and dtype is None:
                dtype = torch.float32
            mask = block_causal_mask(position_ids, dtype)
            windows = self.windows
            if mask is not None:
                if isinstance(windows, dict):
                    kw["attention_mask"] = {t: block_causal_mask(position_ids, dtype, w) for t, w in windows.items()}
                else:
                    kw["attention_mask"] = block_causal_mask(position_ids, dtype, windows) if windows else mask
        return kw

    def unflatten(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """Undo the varlen flattening on a (1, B*L, ...) output."""
        return t.reshape(batch, -1, *t.shape[2:]) if self.mode == "varlen" else t


def candidate_modes(attn_implementation: str, requested: str) -> list[str]:
    if (requested == "flex") != (attn_implementation == FLEX_IMPL) and requested != "auto":
        raise ConfigError(
            "doc_masking = 'flex' and attn_implementation = 'flex' go together; "
            f"got doc_masking = {requested!r} with {attn_implementation!r} (use 'auto')"
        )
    if attn_implementation == FLEX_IMPL:
        return ["flex"]
    if requested != "auto":
        if requested == "varlen" and attn_implementation not in VARLEN_IMPLS:
            raise ConfigError(
                f"doc_masking = 'varlen' needs a varlen attention implementation, not {attn_implementation!r}"
            )
        if requested != "varlen" and attn_implementation in VARLEN_IMPLS:
            raise ConfigError(
                f"doc_masking = {requested!r} does not work with {attn_implementation}; use 'varlen' or 'auto'"
            )
        return [requested]
    if attn_implementation in VARLEN_IMPLS:
        return ["varlen"]
    import transformers
    from packaging.version import Version

    modes = ["mask4d"]
    if Version(transformers.__version__) >= Version("4.53.1") and attn_implementation in ("sdpa", "eager"):
        modes.insert(0, "positions")
    return modes


def _input_gradient(
    model, masking: DocMasking, device: torch.device, autocast_dtype, lengths: tuple[int, int], outputs
) -> torch.Tensor:
    """(T, H) gradient of the summed logits at token positions `outputs` with respect to the
    input embeddings, on a real pack of two random documents of `lengths`, through the same
    inputs training uses. Masked scores are exactly zero after the softmax, so any nonzero
    entry is a real dependence, in any dtype."""
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    n = sum(lengths)
    ids = torch.randint(3, vocab, (1, n), generator=g).to(device)
    pos = torch.cat([torch.arange(k) for k in lengths])[None].to(device)
    cu = torch.tensor([[0, lengths[0], n]], dtype=torch.int32, device=device)
    kw = masking.model_inputs(ids, pos, autocast_dtype or next(model.parameters()).dtype, cu)
    captured: list[torch.Tensor] = []

    def leaf(module, inputs, output):  # the embeddings as a leaf: d out / d embeds
        captured.append(output.detach().requires_grad_(True))
        return captured[-1]

    # A hook, not a call of the embedding alone: a sharded engine (FSDP2) gathers the weights
    # only when the model itself runs.
    hook = model.get_input_embeddings().register_forward_hook(leaf)
    was_training = model.training
    model.eval()  # no dropout: the probe must be deterministic
    try:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(**kw).logits
        out = masking.unflatten(out, 1)
        (grad,) = torch.autograd.grad(out[0, outputs].float().sum(), captured[0])
    finally:
        hook.remove()
        model.train(was_training)
    return grad.reshape(-1, grad.shape[-1])


def probe_isolation(
    model, masking: DocMasking, device: torch.device, autocast_dtype: torch.dtype | None = None
) -> float:
    """Max |d out(doc 2) / d embeds(doc 1)| on a two-document pack; 0.0 means isolated."""
    n1, n2 = 5, 6
    grad = _input_gradient(model, masking, device, autocast_dtype, (n1, n2), slice(n1, n1 + n2))
    return float(grad[:n1].abs().max())


def probe_causality(
    model, masking: DocMasking, device: torch.device, autocast_dtype: torch.dtype | None = None
) -> float:
    """Max |d out(early positions) / d embeds(later positions)| within each document of a
    two-document pack; 0.0 means causal. A kernel called without its causal flag (torch 2.11's
    varlen is bidirectional by default) isolates documents and agrees packed-vs-alone: only
    this sees it."""
    n1, n2 = 6, 7
    early = [0, 1, 2, n1, n1 + 1, n1 + 2]
    later = [3, 4, 5, *range(n1 + 3, n1 + n2)]
    grad = _input_gradient(model, masking, device, autocast_dtype, (n1, n2), early)
    return float(grad[later].abs().max())


def probe_logits(model, masking: DocMasking, device: torch.device, autocast_dtype: torch.dtype | None = None) -> float:
    """Max |packed - alone| of each document's logits (relative to the largest |logit|) on a
    pack of two documents each longer than the model's largest sliding window (5 and 6
    tokens when it has none), through the same inputs training uses (the batch's cu_seqlens
    included). A mask that drops a window isolates documents but not this."""
    vocab = model.get_input_embeddings().weight.shape[0]
    w = largest_window(masking.windows) or 0
    lengths = (w + 3, w + 5) if w else (5, 6)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, vocab, (n,), generator=g).to(device) for n in lengths]
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    cu = torch.tensor([[0, lengths[0], sum(lengths)]], dtype=torch.int32, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            kw = masking.model_inputs(ids, pos, autocast_dtype or torch.float32, cu)
            packed = masking.unflatten(model(**kw).logits, 1)[0].float()
            worst, start = 0.0, 0
            for d in docs:
                alone_kw = masking.model_inputs(d[None], torch.arange(len(d), device=device)[None], autocast_dtype)
                alone = masking.unflatten(model(**alone_kw).logits, 1)[0].float()
                diff = (packed[start : start + len(d)] - alone).abs().max() / alone.abs().max().clamp_min(1.0)
                worst, start = max(worst, float(diff)), start + len(d)
    finally:
        model.train(was_training)
    return worst


def logits_tolerance(autocast_dtype: torch.dtype | None) -> float:
    """`probe_logits` bound: fp32 kernels agree to ~1e-6; half precision rounds to ~1e-2."""
    return 1e-4 if autocast_dtype is None else 5e-2


def probe_failure(model, masking: DocMasking, device: torch.device, autocast_dtype=None) -> str | None:
    """Why `masking` cannot train this model (the start-up probes, in order), or None."""
    try:
        leak = probe_isolation(model, masking, device, autocast_dtype)
        if leak:
            return f"cross-document gradient {leak:.3g}"
        ahead = probe_causality(model, masking, device, autocast_dtype)
        if ahead:
            return f"not causal: outputs depend on later tokens (gradient {ahead:.3g})"
        diff = probe_logits(model, masking, device, autocast_dtype)
    except Exception as e:  # a backend that rejects this way of calling it
        log.debug("document masking %r failed its probe", masking.mode, exc_info=True)
        return f"error: {type(e).__name__}: {first_line(e)}"
    tol = logits_tolerance(autocast_dtype)
    if diff > tol:
        return (
            f"packed logits differ from each document alone by {diff:.3g} (> {tol:g}; sliding window "
            f"{largest_window(masking.windows)} not applied?)"
        )
    return None


def select_masking(
    model,
    attn_implementation: str,
    requested: str,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    fallback: bool = False,
) -> DocMasking:
    """The first way of calling the model that passes the probes (isolation, causality, packed
    vs alone). With `fallback` (``auto`` chose `attn_implementation`) a failing implementation
    is replaced in the loaded model by the next of `fallback_chain`, and the switch is logged in
    one line; otherwise, or when nothing passes, a ConfigError names why each failed."""
    failed: dict[str, str] = {}
    windows = attention_windows(model.config)
    for impl in fallback_chain(attn_implementation, device) if fallback else [attn_implementation]:
        if impl != model.config._attn_implementation:
            try:
                switch_implementation(model, impl)
            except Exception as e:
                failed[impl] = f"cannot switch to it: {first_line(e)}"
                continue
        for mode in candidate_modes(impl, "auto" if impl != attn_implementation else requested):
            masking = DocMasking(mode, impl, windows)
            why = probe_failure(model, masking, device, autocast_dtype)
            if why is None:
                if failed:
                    log.warning(
                        "attention: %s; training with %s (documents kept apart by %s)", _describe(failed), impl, mode
                    )
                return masking
            failed[f"{impl}, {mode}"] = why
    raise ConfigError(
        f"cannot keep documents apart with attn_implementation={attn_implementation!r} ({_describe(failed)}); "
        "try attn_implementation = 'sdpa' or 'eager'"
    )


def _describe(failed: dict[str, str]) -> str:
    return "; ".join(f"{what}: {why}" for what, why in failed.items())
