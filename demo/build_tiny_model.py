"""Builds the demo's model folder demo/tiny-llama/ (shipped; rerun to regenerate).

A byte-level BPE tokenizer trained offline with the `tokenizers` library on the demo's own
text, saved as a normal Hugging Face tokenizer folder with a ChatML chat template, and a
Llama config of about a million parameters. No weights are shipped: tokentrain starts a
model from its config when the folder has none (training from scratch).
"""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

HERE = Path(__file__).parent
SPECIAL = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # ids 0..4; id 0 never occurs in text
CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def corpus():
    for name in ("chat.jsonl", "text.jsonl"):
        for line in (HERE / "data" / name).read_text().splitlines():
            row = json.loads(line)
            if "messages" in row:
                for m in row["messages"]:
                    yield f"{m['role']}\n{m['content']}"
            else:
                yield row["text"]


def main(out: Path = HERE / "tiny-llama") -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=768, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        additional_special_tokens=["</s>", "<|im_start|>"],
    )
    fast.chat_template = CHATML
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    # Name the class every transformers release knows (5.x writes "TokenizersBackend").
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=4,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    config.save_pretrained(out)
    print(f"wrote {out}: vocab {len(fast)}")


if __name__ == "__main__":
    main()
