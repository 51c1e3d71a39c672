"""Write the built-in sample chat data (data/sample/*.jsonl): a small, learnable task.

Answers follow fixed templates, so even a tiny random model's validation loss falls within a
few hundred steps. Deterministic: python scripts/make_sample_data.py rewrites the same files. The 64 validation
conversations are none of the 320 training ones (data.min_val_examples is 50).
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa",
    "Egypt": "Cairo", "Norway": "Oslo", "Chile": "Santiago", "India": "New Delhi", "Spain": "Madrid",
    "Italy": "Rome", "Ghana": "Accra", "Poland": "Warsaw", "Cuba": "Havana", "Nepal": "Kathmandu",
    "Greece": "Athens", "Mexico": "Mexico City", "Turkey": "Ankara", "Iran": "Tehran", "Mali": "Bamako",
}
WORDS = ["river", "garden", "planet", "silver", "window", "market", "winter", "forest", "castle",
         "bridge", "candle", "mirror", "thunder", "lantern", "harbor", "meadow"]
SYSTEMS = ["You are a concise assistant.", "Answer in one sentence.", "Réponds brièvement. 🙂"]


def capital(rng):
    country = rng.choice(list(CAPITALS))
    return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."


def reverse(rng):
    word = rng.choice(WORDS)
    return f"Spell '{word}' backwards.", f"'{word}' backwards is '{word[::-1]}'."


def add(rng):
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."


def conversation(rng):
    turns = rng.choice([1, 1, 1, 2])
    messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.3 else []
    for _ in range(turns):
        question, answer = rng.choice([capital, reverse, add])(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def main():
    rng = random.Random(1234)
    out = Path(__file__).resolve().parent.parent / "data" / "sample"
    out.mkdir(parents=True, exist_ok=True)
    train = [json.dumps(conversation(rng), ensure_ascii=False) for _ in range(320)]
    seen, val = set(train), []
    while len(val) < 64:  # held out for real: no validation conversation also in training
        line = json.dumps(conversation(rng), ensure_ascii=False)
        if line not in seen:
            seen.add(line)
            val.append(line)
    for name, lines in (("train.jsonl", train), ("val.jsonl", val)):
        (out / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
