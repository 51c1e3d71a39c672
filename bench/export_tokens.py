"""Write the benchmark's training examples as token ids + loss masks (our data layer's output), so that
a trainer running in another environment (bench/unsloth_baseline.py: Unsloth pins older transformers
and TRL than ours) trains on exactly the same tokens as `bench/ablation.py` and `qlora train`.

  python bench/export_tokens.py --config bench/h100_bench.yaml --out /tmp/bench-data/tokens.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bench/h100_bench.yaml")
    parser.add_argument("--train-subset", type=int, default=4000, help="first N training examples (as ablation.py)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from common.config.loader import load_config
    from common.data.prepare import prepare_data
    from common.data.tokenize import ChatTokenizer

    cfg = load_config(args.config)
    examples = prepare_data(cfg.data, ChatTokenizer()).train[: args.train_subset]
    Path(args.out).write_text(json.dumps({
        "max_seq_length": cfg.data.max_seq_length,
        "input_ids": [e.input_ids for e in examples],
        "loss_mask": [e.loss_mask for e in examples],
    }))
    print(f"wrote {len(examples)} examples, {sum(len(e.input_ids) for e in examples):,} tokens to {args.out}")


if __name__ == "__main__":
    main()
