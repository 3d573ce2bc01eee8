"""Evaluation during training: validation loss, and sample generations to read.

Validation loss uses exactly the training rules -- same packing, masking and targets --
and is token-weighted: the sum of CE over all target tokens of the validation set (all
ranks) divided by their count.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import torch

from tokentrain.data.batch import collate
from tokentrain.run.parent_watch import worker_init_fn

if TYPE_CHECKING:
    from tokentrain.engines.base import Engine

log = logging.getLogger(__name__)


def validation_loss(engine: Engine, dataset, env, batch_size: int, num_workers: int) -> float:
    from torch.utils.data import DataLoader

    from tokentrain.data.sampler import ResumableSampler

    sampler = ResumableSampler(len(dataset), env.rank, env.world_size, seed=0, shuffle=False)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        worker_init_fn=worker_init_fn() if num_workers else None,  # workers die with the rank
    )
    module = engine.unwrapped  # no DDP hooks needed without backward
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
    total, targets = engine.all_reduce_sum([loss_sum, float(count)])
    return total / targets if targets else 0.0


def build_prompt(tokenizer, text: str, system: str) -> str:
    """The prompt for one evaluation input: the tokenizer's chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # e.g. a template that refuses a system turn
            log.debug("chat template failed (%s); using plain text", e)
    return f"{system}{text}"


def eager() -> contextlib.AbstractContextManager:
    """Compiled decoder layers (`compile`) run eagerly for generation: one token at a time against
    a growing cache would recompile them, for a few tokens of output."""
    stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return stance("force_eager") if stance is not None else contextlib.nullcontext()


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
            with (
                torch.no_grad(),
                torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype is not None),
                eager(),
            ):
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


class Evaluator:
    """Validation loss and sample generations, every `evaluation_freq` steps and at the end."""

    def __init__(self, cfg, env, engine: Engine, val_set, hf_model, tokenizer, compute_dtype, work_dir, metrics):
        self.cfg, self.env, self.engine, self.val_set = cfg, env, engine, val_set
        self.hf_model, self.tokenizer, self.compute_dtype = hf_model, tokenizer, compute_dtype
        self.path = work_dir / "generations.jsonl"
        self.metrics = metrics

    def due(self, step: int, *, last: bool) -> bool:
        return step % self.cfg.evaluation_freq == 0 or last

    def run(self, step: int, *, val: bool = True, generate: bool = True) -> dict:
        """{"val_loss": ...} (when there is a validation set); samples go to generations.jsonl.
        The RNG is forked: evaluating never changes the training run."""
        import json

        cfg, env = self.cfg, self.env
        out = {}
        with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
            if val and self.val_set is not None:
                out["val_loss"] = validation_loss(self.engine, self.val_set, env, cfg.batch_size, 0)
            everyone = self.engine.partitioned_params  # ZeRO-3 / FSDP: all ranks generate together
            if not (generate and cfg.evaluation_inputs and (env.is_main or everyone)):
                return out
            try:
                samples = generate_samples(
                    self.hf_model,
                    self.tokenizer,
                    cfg.evaluation_inputs,
                    cfg.SYSTEM,
                    cfg.evaluation_max_new_tokens,
                    env.device,
                    self.compute_dtype,
                    synced=everyone,
                )
            except Exception as e:  # a sample to read is not worth a crashed run
                self.metrics.message(f"generation at step {step} failed: {type(e).__name__}: {e}")
                samples = []
            if not env.is_main:
                return out
            with open(self.path, "a") as f:
                for prompt, text in samples:
                    self.metrics.message(f"sample at step {step}: {prompt!r} -> {text!r}")
                    f.write(json.dumps({"step": step, "input": prompt, "output": text}, ensure_ascii=False) + "\n")
        return out
