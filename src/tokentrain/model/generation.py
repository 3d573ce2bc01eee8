"""Text from a causal LM: the prompt (chat template or plain text), then greedy or sampled
tokens, optionally streamed as they come. One code path for training's evaluation samples
and for `tokentrain generate` / `tokentrain chat`, so what a run printed as its samples is
what the exported model answers."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy (deterministic)
    top_p: float = 1.0

    def generate_kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


def templated(tokenizer, messages: list[dict], template: str | None = None) -> str | None:
    """The conversation through the chat template (the tokenizer's, or `template`), ending where the
    assistant answers; None when there is no template or it refuses the messages."""
    template = template or getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
    except Exception as e:  # e.g. a template that refuses a system turn
        log.debug("chat template failed (%s); using plain text", e)
        return None


def one_turn(text: str, system: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def build_prompt(tokenizer, text: str, system: str, template: str | None = None) -> tuple[str, bool]:
    """(prompt, whether it is templated) for one input: the chat template when there is one, else
    the system text then the input."""
    prompt = templated(tokenizer, one_turn(text, system), template)
    return (prompt, True) if prompt is not None else (f"{system}{text}", False)


def encode(tokenizer, prompt: str, is_templated: bool, device: torch.device):
    """A templated prompt holds its own special tokens (the template writes BOS where the model
    wants it); plain text gets the tokenizer's."""
    return tokenizer(prompt, return_tensors="pt", add_special_tokens=not is_templated).to(device)


def eager() -> contextlib.AbstractContextManager:
    """Compiled decoder layers (the `compile` setting) run eagerly for generation: one token at a
    time against a growing cache would recompile them, for a few tokens of output."""
    stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return stance("force_eager") if stance is not None else contextlib.nullcontext()


def generate_ids(
    model,
    tokenizer,
    enc,
    sampling: Sampling,
    compute_dtype: torch.dtype | None = None,
    streamer=None,
    synced: bool = False,
) -> torch.Tensor:
    """The new token ids after the prompt `enc` (the model in eval mode). `streamer`: transformers'
    streamer, given each token as it comes. `synced`: every rank runs this together (ZeRO-3),
    each forward gathering parameters; ranks keep stepping until all are done."""
    dev = enc["input_ids"].device
    with (
        torch.no_grad(),
        torch.autocast(dev.type, dtype=compute_dtype, enabled=compute_dtype is not None),
        eager(),
    ):
        out = model.generate(
            **enc,
            max_new_tokens=sampling.max_new_tokens,
            use_cache=True,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **sampling.generate_kwargs(),
            **({"synced_gpus": True} if synced else {}),
        )
    return out[0, enc["input_ids"].shape[1] :]
