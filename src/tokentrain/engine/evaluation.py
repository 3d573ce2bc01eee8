"""Evaluation during training: validation loss, and sample generations to read.

Validation loss uses exactly the training rules -- same packing, masking and targets --
and is token-weighted: the sum of CE over all target tokens of the validation set (all
ranks) divided by their count.
"""

from __future__ import annotations

import logging

import torch

from tokentrain.data.batch import collate

log = logging.getLogger(__name__)


def validation_loss(strategy, dataset, env, batch_size: int, num_workers: int) -> float:
    from torch.utils.data import DataLoader

    from tokentrain.data.sampler import ResumableSampler

    sampler = ResumableSampler(len(dataset), env.rank, env.world_size, seed=0, shuffle=False)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=num_workers)
    module = strategy.unwrapped  # no DDP hooks needed without backward
    was = module.training
    module.eval()
    loss_sum, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in loader:
                batch = batch.to(env.device)
                loss_sum += float(module(batch.input_ids, batch.labels, batch.position_ids, batch.cu_seqlens))
                count += batch.num_targets
    finally:
        module.train(was)
    loss_sum, count = strategy.all_reduce_sum([loss_sum, float(count)])
    return loss_sum / count if count else 0.0


def build_prompt(tokenizer, text: str, system: str) -> str:
    """The prompt for one evaluation input: the tokenizer's chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # e.g. a template that refuses a system turn
            log.debug("chat template failed (%s); using plain text", e)
    return f"{system}{text}"


def generate_samples(
    model,
    tokenizer,
    inputs: list[str],
    system: str,
    max_new_tokens: int,
    device: torch.device,
    compute_dtype: torch.dtype | None,
    synced: bool = False,
) -> list[tuple[str, str]]:
    """Greedy continuations of each evaluation input; [(input, generated text)].

    `synced`: every rank runs this together (ZeRO-3), each forward gathering parameters;
    ranks keep stepping until all are done, as transformers' `synced_gpus` does."""
    results = []
    was = model.training
    model.eval()
    try:
        for text in inputs:
            prompt = build_prompt(tokenizer, text, system)
            enc = tokenizer(
                prompt, return_tensors="pt", add_special_tokens=not getattr(tokenizer, "chat_template", None)
            ).to(device)
            with torch.no_grad(), torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype is not None):
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    use_cache=True,
                    **({"synced_gpus": True} if synced else {}),
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            new = out[0, enc["input_ids"].shape[1] :]
            results.append((text, tokenizer.decode(new, skip_special_tokens=True)))
    finally:
        model.train(was)
    return results
