"""Writes the demo's source data (shipped in demo/data/; rerun to regenerate, deterministic).

The task is chosen so a model of about a million parameters visibly learns it in a few
minutes on a CPU: world capitals and single-digit sums, asked in a few phrasings, in
the common chat `messages` format. The facts are public knowledge; the text is ours.
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Sweden": "Stockholm",
    "Norway": "Oslo",
    "Ireland": "Dublin",
    "Hungary": "Budapest",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Canada": "Ottawa",
    "Cuba": "Havana",
    "Australia": "Canberra",
    "Nepal": "Kathmandu",
    "Iceland": "Reykjavik",
}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SYSTEM = "You are a concise assistant."
CAPITAL_Q = ["What is the capital of {c}?", "Name the capital city of {c}.", "Which city is the capital of {c}?"]
SUM_Q = ["What is {a} plus {b}?", "Add {a} and {b}."]


def conversations():
    for c, cap in CAPITALS.items():
        for q in CAPITAL_Q:
            yield q.format(c=c), f"The capital of {c} is {cap}.", cap
    for a in range(10):
        for b in range(10):
            for q in SUM_Q:
                yield q.format(a=a, b=b), f"{a} plus {b} is {a + b}.", str(a + b)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = list(conversations())
    random.Random(0).shuffle(rows)
    with open(out / "chat.jsonl", "w") as f:
        for q, a, _ in rows:
            msgs = [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
    # Evaluation: one question per fact, with the word that a right answer must contain.
    evals = [(CAPITAL_Q[0].format(c=c), cap) for c, cap in CAPITALS.items()]
    evals += [
        (SUM_Q[0].format(a=a, b=b), str(a + b))
        for a, b in random.Random(1).sample([(a, b) for a in range(10) for b in range(10)], 40)
    ]
    with open(out / "eval.jsonl", "w") as f:
        for q, want in evals:
            f.write(json.dumps({"question": q, "answer": want}) + "\n")
    # Plain text for the tokenizer and as a pre-training sample of the `text` format.
    with open(out / "text.jsonl", "w") as f:
        for c, cap in CAPITALS.items():
            f.write(json.dumps({"text": f"{cap} is the capital of {c}. The capital of {c} is {cap}."}) + "\n")
        for a in range(10):
            f.write(json.dumps({"text": " ".join(f"{a} plus {b} is {a + b}." for b in range(10))}) + "\n")


if __name__ == "__main__":
    main(Path(__file__).parent / "data")
