"""Tiny random models of the families with sliding windows (and llama), built from configs."""

from __future__ import annotations

import torch

WINDOW = 4  # shorter than every test document


def config(family: str, window: int | None = WINDOW):
    import transformers as tf

    common = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=window)
    if family == "qwen2":  # layer 0 full, layer 1 sliding
        return tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=window, max_window_layers=1)
    if family == "phi3":
        return tf.Phi3Config(**common, sliding_window=window)
    if family == "starcoder2":
        return tf.Starcoder2Config(**common, sliding_window=window)
    if family == "gemma2":  # alternating sliding / full layers, soft-capped scores and logits
        return tf.Gemma2Config(
            **common, head_dim=8, sliding_window=window, attn_logit_softcapping=50.0, final_logit_softcapping=30.0
        )
    if family == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=8, sliding_window=window, sliding_window_pattern=2)
    raise ValueError(family)


def model(family: str, attn_implementation: str, window: int | None = WINDOW, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(
        config(family, window), dtype=torch.float32, attn_implementation=attn_implementation
    )
    m.config.use_cache = False
    return m.eval()


def pack(vocab: int, lengths=((9, 12, 7), (15, 13))):
    """Two packed rows of documents longer than WINDOW: (docs, ids, position_ids, cu_seqlens)."""
    g = torch.Generator().manual_seed(5)
    docs = [[torch.randint(3, vocab, (n,), generator=g) for n in row] for row in lengths]
    ids = torch.stack([torch.cat(row) for row in docs])
    pos = torch.stack([torch.cat([torch.arange(len(d)) for d in row]) for row in docs])
    width = max(len(r) for r in lengths) + 1
    cu = torch.full((len(lengths), width), ids.shape[1], dtype=torch.int32)
    for r, row in enumerate(lengths):
        cu[r, : len(row) + 1] = torch.tensor([0, *torch.tensor(row).cumsum(0).tolist()])
    return docs, ids, pos, cu


def worst_vs_alone(packed: torch.Tensor, docs, alone_fn) -> float:
    """Max |packed - alone| over every document of every row."""
    worst = 0.0
    for r, row in enumerate(docs):
        start = 0
        for d in row:
            worst = max(worst, float((packed[r, start : start + len(d)] - alone_fn(d)).abs().max()))
            start += len(d)
    return worst


def assert_loss_and_gradients_stay_in_document(m, masking) -> None:
    """Through `CausalLMWithLoss` and `masking`: the loss of a pack whose only targets are its
    second document equals that document's loss alone, and no gradient reaches another token."""
    from tokentrain.model.lm import CausalLMWithLoss

    lm = CausalLMWithLoss(m, masking, None)
    docs, ids, pos, cu = pack(m.config.vocab_size)
    labels = torch.full_like(ids, -100)
    labels[0, 9 : 9 + 11] = docs[0][1][1:]  # only the second document of row 0 has targets
    loss = lm(ids, labels, pos, cu)
    alone_labels = torch.full((1, 12), -100)
    alone_labels[0, :-1] = docs[0][1][1:]
    alone = lm(docs[0][1][None], alone_labels, torch.arange(12)[None])
    assert abs(loss.item() - alone.item()) <= 1e-5 * abs(alone.item())
    embeds = m.get_input_embeddings()(ids).detach().requires_grad_(True)
    kw = masking.model_inputs(ids, pos, None, cu)
    kw.pop("input_ids")
    flat = embeds.reshape(1, -1, embeds.shape[-1]) if masking.mode == "varlen" else embeds
    logits = masking.unflatten(m(inputs_embeds=flat, **kw).logits, ids.shape[0])
    (g,) = torch.autograd.grad(
        torch.nn.functional.cross_entropy(logits[labels != -100], labels[labels != -100]), embeds
    )
    inside = torch.zeros(ids.shape, dtype=torch.bool)
    inside[0, 9:21] = True
    assert g[~inside].abs().max().item() == 0.0 and g[inside].abs().max().item() > 0
