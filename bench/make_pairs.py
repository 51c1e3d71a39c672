"""Synthetic preference pairs with realistic lengths, for DPO speed and memory (which depend on token
counts, not on what the words say): each conversation of bench/make_chat_data.py becomes a pair whose
prompt is everything before its last answer, chosen that answer, rejected another conversation's.

  python bench/make_chat_data.py --kind chat --train 2000 --val 100 --out /tmp/bench-data
  python bench/make_pairs.py /tmp/bench-data/train.jsonl /tmp/bench-pairs/train.jsonl
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path


def pairs(conversations: list[list[dict]], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    answers = [c[-1]["content"] for c in conversations]
    out = []
    for index, messages in enumerate(conversations):
        other = rng.randrange(len(answers) - 1)
        rejected = answers[other + (other >= index)]
        out.append({"prompt": messages[:-1], "chosen": [messages[-1]],
                    "rejected": [{"role": "assistant", "content": rejected}]})
    return out


if __name__ == "__main__":
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    conversations = [json.loads(line)["messages"] for line in source.read_text().splitlines() if line.strip()]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(json.dumps(p) + "\n" for p in pairs(conversations)))
    print(f"{target}: {len(conversations)} pairs")
