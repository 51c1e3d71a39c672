"""Synthetic chat data with realistic lengths, for benchmarks (speed and memory do not depend on
what the words say, only on how many tokens there are and how they are split into turns).

  python bench/make_chat_data.py --kind chat --train 15000 --val 300 --out /tmp/bench-data

Distributions (words; about 1.3 Mistral tokens a word):
  chat: 30% have a system prompt (10-40 words); 1 turn (70%), 2 (20%) or 3 (10%); user turns
        lognormal(median 60, sigma 0.9), assistant turns lognormal(median 220, sigma 0.8).
        About 650-750 tokens an example, like common instruction-tuning sets.
  long: long-tailed documents: 1 turn; user lognormal(median 400, sigma 0.7), assistant
        lognormal(median 1400, sigma 0.6): many examples near or past 4096 tokens.
  short: chat at half the length (user median 30, assistant 110 words): ~1.8 KB and ~370 tokens an
        example, so 1,000,000 of them make the ~1.8 GB file of docs/data-at-scale.md.
  document: long-context fine-tuning: a user turn holding a document (lognormal median 5,000 words,
        sigma 0.8, capped at 24,000 ~ 31K tokens) and an answer of ~300 words: examples from ~1K to
        past 32K tokens, for data.max_seq_length 8192-32768 (configs/long_context.md).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

WORDS = (
    "the of and to in is for that on with as it by this be are from at or an was which have not "
    "model data training time memory value system process result function method example number "
    "user question answer because however therefore first second next finally also each other "
    "large small fast slow simple complex important different possible common general specific "
    "analysis design structure problem solution approach step point case part form level type "
    "information language network output input layer weight gradient batch sequence token text "
    "Paris river garden planet window market winter forest castle bridge candle mirror harbor "
    "explain describe compare consider suggest provide include require improve reduce increase "
    "über café naïve résumé 東京 数据 模型 😀 ✓ → 42 2026 3.14 100% (see below) e.g. i.e. etc."
).split()

DISTRIBUTIONS = {
    "chat": dict(system=0.3, turns=(1, 1, 1, 1, 1, 1, 1, 2, 2, 3), user=(60, 0.9), assistant=(220, 0.8)),
    "long": dict(system=0.2, turns=(1,), user=(400, 0.7), assistant=(1400, 0.6)),
    "short": dict(system=0.3, turns=(1, 1, 1, 1, 1, 1, 1, 2, 2, 3), user=(30, 0.9), assistant=(110, 0.8)),
    "document": dict(system=0.2, turns=(1,), user=(5000, 0.8, 24000), assistant=(300, 0.5)),
}


def text(rng: random.Random, median: float, sigma: float, cap: int = 4000) -> str:
    n = max(3, min(cap, int(rng.lognormvariate(math.log(median), sigma))))
    words = [rng.choice(WORDS) for _ in range(n)]
    for i in range(12, n, rng.randint(12, 25)):
        words[i] += "."
    return " ".join(words)


def conversation(rng: random.Random, kind: str) -> dict:
    spec = DISTRIBUTIONS[kind]
    messages = []
    if rng.random() < spec["system"]:
        messages.append({"role": "system", "content": text(rng, 20, 0.4, cap=40)})
    for _ in range(rng.choice(spec["turns"])):
        messages.append({"role": "user", "content": text(rng, *spec["user"])})
        messages.append({"role": "assistant", "content": text(rng, *spec["assistant"])})
    return {"messages": messages}


def write(path: Path, rng: random.Random, kind: str, count: int) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(count):
            handle.write(json.dumps(conversation(rng, kind), ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=sorted(DISTRIBUTIONS), default="chat")
    parser.add_argument("--train", type=int, default=15000)
    parser.add_argument("--val", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    write(out / "train.jsonl", rng, args.kind, args.train)
    write(out / "val.jsonl", rng, args.kind, args.val)


if __name__ == "__main__":
    main()
