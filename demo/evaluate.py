"""Accuracy of a model on the demo task: greedy answers to demo/data/eval.jsonl.

    python demo/evaluate.py MODEL_DIR            # a trained HF folder (e.g. demo_out/work/hf)
    python demo/evaluate.py --init demo/tiny-llama --seed 1024   # the untrained start

An answer is right when it contains the expected word (a capital, or a sum). Prints the
rate and a few examples; writes nothing.
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).parent
SYSTEM = "You are a concise assistant."


def load(args):
    path = args.init or args.model
    tok = AutoTokenizer.from_pretrained(path)
    if args.init:
        torch.manual_seed(args.seed)  # the trainer's from-scratch init: same seed, same weights
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return tok, model.eval()


def answer(tok, model, question: str, max_new_tokens: int = 16) -> str:
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--init", metavar="CONFIG_DIR", help="evaluate the untrained model built from this config")
    ap.add_argument("--seed", type=int, default=1024)
    ap.add_argument("--label", default="")
    ap.add_argument("--json", metavar="OUT", help="write {'accuracy': ..., 'right': ..., 'total': ...} here")
    args = ap.parse_args()
    if not (args.model or args.init):
        ap.error("give MODEL_DIR or --init CONFIG_DIR")
    tok, model = load(args)
    rows = [json.loads(line) for line in (HERE / "data" / "eval.jsonl").read_text().splitlines() if line.strip()]
    right, shown = 0, []
    for row in rows:
        text = answer(tok, model, row["question"])
        ok = row["answer"] in text.replace(".", " ").split() or f" {row['answer']}." in f" {text}"
        right += ok
        if len(shown) < 4:
            shown.append(f"    {'RIGHT' if ok else 'wrong'}  Q: {row['question']}  A: {text!r}")
    rate = right / len(rows)
    print(f"{args.label or (args.model or 'untrained')}: {right}/{len(rows)} right ({rate:.0%})")
    print("\n".join(shown))
    if args.json:
        Path(args.json).write_text(json.dumps({"accuracy": rate, "right": right, "total": len(rows)}))


if __name__ == "__main__":
    main()
