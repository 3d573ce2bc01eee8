"""The `flex` attention mode on CPU: PyTorch's real flex_attention forward (unfused here) with our
document block masks must equal each document run alone, on every family with a window or a
soft-cap; flex has no backward on CPU, so gradients are checked with the kernel replaced by a
plain-torch reference that reads the same BlockMask. The fused CUDA kernel: bench/gpu_check.sh."""

from __future__ import annotations

import pytest
import torch

import tokentrain.model.flex as flex
import tokentrain.model.masks as masks
from tokentrain.errors import ConfigError
from tokentrain.model.attention import (
    DocMasking,
    attention_windows,
    candidate_modes,
    choose_attn_implementation,
    select_masking,
)
from tokentrain.model.lm import soft_caps_attention

from .families import WINDOW, assert_loss_and_gradients_stay_in_document, config, model, pack, worst_vs_alone

FAMILIES = ["llama", "qwen2", "mistral", "gemma2", "phi3", "starcoder2", "gemma3"]
MASK_WINDOWS = {  # which block masks each family's layers need: None = causal in each document
    "llama": [None],
    "qwen2": [None, WINDOW],
    "mistral": [WINDOW],
    "gemma2": [None, WINDOW],
    "phi3": [WINDOW],
    "starcoder2": [WINDOW],
    "gemma3": [None, WINDOW],
}


def _masking(m) -> DocMasking:
    return DocMasking("flex", flex.FLEX_IMPL, attention_windows(m.config))


@pytest.mark.parametrize("family", FAMILIES)
def test_flex_attention_matches_each_document_alone(family):
    m = model(family, flex.FLEX_IMPL)
    ref = model(family, "eager")
    ref.load_state_dict(m.state_dict())
    docs, ids, pos, cu = pack(m.config.vocab_size)
    with torch.no_grad():
        kw = _masking(m).model_inputs(ids, pos, None, cu)
        packed = m(**kw).logits
        worst = worst_vs_alone(packed, docs, lambda d: ref(input_ids=d[None], use_cache=False).logits[0])
    assert worst <= 1e-5
    built = kw[flex.FLEX_MASKS]
    assert sorted(built, key=lambda w: -1 if w is None else w) == MASK_WINDOWS[family]
    assert all(bm.shape == (2, 1, 28, 28) for bm in built.values())  # per row of the batch, (B, H, L, L)


def _reference(calls):
    """flex_attention in plain torch (autograd works on CPU): the BlockMask's own mask_mod and the
    score_mod evaluated densely."""

    def kernel(q, k, v, score_mod=None, block_mask=None, scale=None, enable_gqa=False):
        b, h, n, d = q.shape
        calls.append({"gqa": enable_gqa, "scale": scale, "softcap": score_mod is not None, "mask": block_mask})
        assert (k.shape[1] != h) == enable_gqa
        k, v = (t.repeat_interleave(h // t.shape[1], 1) for t in (k, v))
        idx = [torch.arange(s).view(*(-1 if i == j else 1 for j in range(4))) for i, s in enumerate((b, h, n, n))]
        scores = (q @ k.transpose(-1, -2)) * (d**-0.5 if scale is None else scale)
        if score_mod is not None:
            scores = score_mod(scores, *idx)
        allowed = block_mask.mask_mod(*idx).expand(b, h, n, n)
        return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v

    return kernel


@pytest.fixture
def calls(monkeypatch):
    got: list[dict] = []
    monkeypatch.setattr(flex, "_kernel", lambda device: _reference(got))
    return got


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_flex_loss_and_gradients_stay_in_each_document(family, calls):
    m = model(family, flex.FLEX_IMPL)
    assert_loss_and_gradients_stay_in_document(m, _masking(m))
    layers = m.config.num_hidden_layers
    assert len(calls) >= 2 * layers  # the packed and the alone runs, every layer
    assert all(c["gqa"] for c in calls)  # 4 query heads, 2 kv heads
    assert [c["scale"] for c in calls[:layers]] == pytest.approx([x.self_attn.scaling for x in m.model.layers])
    assert all(c["softcap"] == (family == "gemma2") for c in calls)  # gemma2's cap runs inside the kernel


def test_flex_is_chosen_by_the_probes_and_refuses_what_it_cannot_do(calls):
    m = model("mistral", flex.FLEX_IMPL)
    assert candidate_modes(flex.FLEX_IMPL, "auto") == ["flex"]
    assert select_masking(m, flex.FLEX_IMPL, "auto", torch.device("cpu")).mode == "flex"
    with pytest.raises(ConfigError, match="doc_masking = 'flex' and attn_implementation = 'flex' go together"):
        candidate_modes("sdpa", "flex")
    with pytest.raises(ConfigError, match="go together"):
        candidate_modes(flex.FLEX_IMPL, "mask4d")
    with pytest.raises(ValueError, match="needs flex_block_masks"):
        m(input_ids=torch.arange(3, 9)[None], use_cache=False)


def test_auto_picks_flex_on_cuda_for_soft_capped_models_and_flex_needs_cuda(tmp_path):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # a device object only: no GPU is touched
    assert choose_attn_implementation("auto", cuda, None, soft_capped=True) == flex.FLEX_IMPL
    assert choose_attn_implementation("flex", cuda, None) == flex.FLEX_IMPL
    assert choose_attn_implementation("auto", cpu, None, soft_capped=True) == "sdpa"  # eager after sdpa refuses
    with pytest.raises(ConfigError, match="'flex' needs .* on a CUDA device"):
        choose_attn_implementation("flex", cpu, None)
    config("gemma2").save_pretrained(tmp_path / "g2")
    config("mistral").save_pretrained(tmp_path / "m")
    assert soft_caps_attention(str(tmp_path / "g2"), False) is True
    assert soft_caps_attention(str(tmp_path / "m"), False) is False
    assert soft_caps_attention(str(tmp_path / "missing"), False) is False  # load_model says why later


def test_flex_soft_caps_inside_the_kernel():
    """gemma2 with scores large enough for the cap to matter (random init makes them tiny)."""
    from transformers import AutoModelForCausalLM

    def build(impl, cap):
        cfg = config("gemma2")
        cfg.attn_logit_softcapping = cap
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=impl).eval()
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.data *= 100
        return m

    m, ref, uncapped = build(flex.FLEX_IMPL, 1.0), build("eager", 1.0), build("eager", None)
    docs, ids, pos, cu = pack(m.config.vocab_size)
    with torch.no_grad():
        packed = m(**_masking(m).model_inputs(ids, pos, None, cu)).logits
        worst = worst_vs_alone(packed, docs, lambda d: ref(input_ids=d[None], use_cache=False).logits[0])
        off = worst_vs_alone(packed, docs, lambda d: uncapped(input_ids=d[None], use_cache=False).logits[0])
    assert worst <= 1e-5 and off > 1e-3  # matches the capped model, and the cap shows


def _dense_blocks(num: torch.Tensor, idx: torch.Tensor, n_kv_blocks: int) -> torch.Tensor:
    """(B, H, nQ, nKV) bool from a BlockMask's (num_blocks, indices) pair."""
    out = torch.zeros(*num.shape, n_kv_blocks, dtype=torch.bool)
    for pos in torch.cartesian_prod(*(torch.arange(s) for s in num.shape)).tolist():
        out[tuple(pos)][idx[tuple(pos)][: num[tuple(pos)]].long()] = True
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("window", [None, 50])
def test_block_tables_equal_the_dense_document_mask(seed, window):
    """The fused CUDA kernel reads only the block tables (the CPU path re-evaluates mask_mod, so a
    wrong table passes there): per 128-block, partial iff some but not all of the dense
    document-causal(-window) mask attends, full iff all does; random packs, rows not a
    multiple of 128, documents across block edges, several rows."""
    from tokentrain.model.masks import block_causal_mask

    g = torch.Generator().manual_seed(seed)
    b, n = 3, int(torch.randint(130, 700, (1,), generator=g))
    rows = []
    for _ in range(b):
        cuts = sorted(torch.randint(1, n, (int(torch.randint(0, 6, (1,), generator=g)),), generator=g).tolist())
        bounds = [0, *cuts, n]
        rows.append(torch.cat([torch.arange(e - s) for s, e in zip(bounds, bounds[1:]) if e > s]))
    pos = torch.stack(rows)
    bm = masks.document_block_masks(pos, window)[window]
    assert tuple(bm.shape) == (b, 1, n, n)
    size = 128
    nb = -(-n // size)
    dense = block_causal_mask(pos, None, window)
    if dense is None:
        dense = torch.ones(n, n, dtype=torch.bool).tril_().expand(b, 1, n, n)
    padded = torch.zeros(b, 1, nb * size, nb * size, dtype=torch.bool)
    padded[..., :n, :n] = dense
    blocks = padded.reshape(b, 1, nb, size, nb, size).transpose(3, 4)
    want_any, want_all = blocks.any((-1, -2)), blocks.all((-1, -2))
    partial = _dense_blocks(bm.kv_num_blocks, bm.kv_indices, nb)
    full = _dense_blocks(bm.full_kv_num_blocks, bm.full_kv_indices, nb)
    assert torch.equal(full, want_all)
    assert torch.equal(partial, want_any & ~want_all)
    assert torch.equal(bm.to_dense().bool(), want_any)


def test_a_block_mask_is_refused_for_another_batch_or_length():
    m = model("llama", flex.FLEX_IMPL)
    pos = torch.arange(12)[None]
    other = masks.document_block_masks(torch.arange(10)[None], None)
    with pytest.raises(ValueError, match=r"built for \(1, 1, 10, 10\).*used for a batch of 1 x 12"):
        m(input_ids=torch.arange(3, 15)[None], position_ids=pos, use_cache=False, **{flex.FLEX_MASKS: other})


@pytest.mark.slow
def test_the_compiled_kernel_reads_the_block_tables_right():
    """Inductor's compiled flex kernel (its CPU version here) reads the block tables as the CUDA
    one does: a pack of 2 rows x 300 tokens (not a multiple of 128, documents across block
    edges), GQA, with and without a window, equals sdpa with the dense mask."""
    from tokentrain.model.masks import block_causal_mask

    torch.manual_seed(0)
    lens = [[37, 130, 90, 43], [200, 1, 99]]
    pos = torch.stack([torch.cat([torch.arange(n) for n in r]) for r in lens])
    q, k, v = torch.randn(2, 4, 300, 16), torch.randn(2, 2, 300, 16), torch.randn(2, 2, 300, 16)
    compiled = torch.compile(flex._FLEX[0], dynamic=False)
    for window in (None, 50):
        out = compiled(q, k, v, block_mask=masks.document_block_masks(pos, window)[window], enable_gqa=True)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=block_causal_mask(pos, None, window), enable_gqa=True
        )
        assert (out - ref).abs().max() <= 1e-5
