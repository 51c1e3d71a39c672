"""How many distinct packed micro-batch lengths a run meets, and when: a kernel that compiles once
per new length (Liger's RoPE, flash-attn-4's first calls) pays once for each.

  python bench/packed_lengths.py --data /tmp/bench-data/train.jsonl --rows 4 --epochs 3

Packs the examples as the CUDA backend does (TRL best-fit-decreasing into rows of max_seq_length),
then draws the rows in a fresh random order each epoch, `--rows` per micro-batch (the Trainer's
sampler shuffles with its own seed, so the counts are typical, not the exact run's).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def packed_row_lengths(examples, max_length: int) -> list[int]:
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    packed = pack_dataset(Dataset.from_dict({"input_ids": [e.input_ids for e in examples]}), max_length, strategy="bfd")
    return [len(row) for row in packed["input_ids"]]


def new_lengths(row_lengths: list[int], rows: int, epochs: int, seed: int = 0, per: int = 100) -> dict:
    seen: set[int] = set()
    new_per: list[int] = []
    step = fresh = 0
    for epoch in range(epochs):
        order = list(range(len(row_lengths)))
        random.Random(seed + epoch).shuffle(order)
        for start in range(0, len(order), rows):
            total = sum(row_lengths[i] for i in order[start : start + rows])
            fresh += total not in seen
            seen.add(total)
            step += 1
            if step % per == 0:
                new_per.append(fresh)
                fresh = 0
    if step % per:
        new_per.append(fresh)
    return {"steps": step, "distinct_lengths": len(seen), f"new_lengths_per_{per}_steps": new_per}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a chat JSONL file")
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=4, help="packed rows per micro-batch")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    from common.config.schema import DataConfig
    from common.data.prepare import read_conversations
    from common.data.tokenize import ChatTokenizer, tokenize_all

    conversations, _ = read_conversations(args.data)
    examples, _, _ = tokenize_all(conversations, ChatTokenizer(), DataConfig(max_seq_length=args.max_length))
    lengths = packed_row_lengths(examples, args.max_length)
    result = {"examples": len(examples), "rows": len(lengths), "distinct_row_lengths": len(set(lengths)),
              "rows_per_micro_batch": args.rows, **new_lengths(lengths, args.rows, args.epochs)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
